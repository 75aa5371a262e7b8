# Watch a ppc64le kernel until it powers off (or --max-events is reached),
# then write the reports and exit: 0 clean, 1 violations or the guest went
# down, 2 no redirection seen.
#
#   gdb-multiarch -batch -x gdbinit.d/gdbklp.py -ex "file VMLINUX" \
#       -ex "target remote 127.0.0.1:PORT" -x gdbinit.d/watch-batch.gdb
#
# Environment: KLP_REPORT_DIR (default .) receives klp-watch.json and
# klp-watch.xml (JUnit); KLP_WATCH_OPTIONS is added to klp-watch start
# (for example "--max-events 500 --fail-fast").
# With the lab: gdbklp lab boot -S --mode run --workload "-t 4 -n 100" prints the port.
python
import os
import gdb

out = os.environ.get("KLP_REPORT_DIR", ".")
# --batch: when the guest goes away the watch writes both reports and ends gdb
# itself (gdb 13.1 can crash when the connection drops while a probe runs)
gdb.execute(f"klp-watch start --batch --report {out}/klp-watch.json --junit {out}/klp-watch.xml "
            f"{os.environ.get('KLP_WATCH_OPTIONS', '')}")
try:
    gdb.execute("continue")
except gdb.error as e:  # the guest powered off: the connection closed
    gdb.write(f"klp-watch: {e}\n")
gdb.execute(f"klp-watch finish --report {out}/klp-watch.json --junit {out}/klp-watch.xml")
end
