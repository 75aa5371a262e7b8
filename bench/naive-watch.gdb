# The baseline klp-watch is measured against: a plain gdb script that checks
# the same redirections with breakpoint `commands`, stopping at the
# trampoline's entry (P1) and again where C returns into it (P3).
# State is kept per task with `eval`, in convenience variables named after the
# task's thread_info. Offsets are those of the lab's 6.1 kernel (thread_info
# at PACA+296, livepatch_sp at thread_info+16, P3 = livepatch_handler+0x30;
# the char * keeps gdb from scaling 0x30 by the size of the symbol's type).
set $naive_entries = 0
set $naive_returns = 0
set $naive_violations = 0

define naive_call_check
  set $call = *(unsigned int *)($arg0 - 4)
  if ($call & 0xfc000003) != 0x48000001 && $call != 0x4e800421
    set $naive_violations = $naive_violations + 1
    printf "naive: return address %#lx does not follow a call\n", $arg0
  end
end

break *livepatch_handler
commands
  silent
  set $ti = *(unsigned long *)($r13 + 296)
  naive_call_check $lr
  eval "set $entry_sp_%lx = $r1", $ti
  eval "set $entry_toc_slot_%lx = *(unsigned long *)($r1 + 24)", $ti
  eval "set $entry_toc_%lx = $r2", $ti
  eval "set $entry_lpsp_%lx = *(unsigned long *)($ti + 16)", $ti
  set $naive_entries = $naive_entries + 1
  continue
end

break *((char *) livepatch_handler + 0x30)
commands
  silent
  set $ti = *(unsigned long *)($r13 + 296)
  set $lpsp = *(unsigned long *)($ti + 16)
  eval "set $expected_lpsp = $entry_lpsp_%lx + 24", $ti
  if $lpsp != $expected_lpsp
    set $naive_violations = $naive_violations + 1
    printf "naive: livepatch_sp %#lx, expected %#lx\n", $lpsp, $expected_lpsp
  end
  if *(unsigned long *)($lpsp - 8) != 0x57ac6e9d
    set $naive_violations = $naive_violations + 1
    printf "naive: livepatch stack magic overwritten\n"
  end
  eval "set $expected_toc = $entry_toc_%lx", $ti
  if *(unsigned long *)($lpsp - 24) != $expected_toc
    set $naive_violations = $naive_violations + 1
    printf "naive: saved TOC %#lx, expected %#lx\n", *(unsigned long *)($lpsp - 24), $expected_toc
  end
  set $saved_ra = *(unsigned long *)($lpsp - 16)
  naive_call_check $saved_ra
  eval "set $expected_sp = $entry_sp_%lx", $ti
  eval "set $expected_toc_slot = $entry_toc_slot_%lx", $ti
  if $r1 != $expected_sp || *(unsigned long *)($r1 + 24) != $expected_toc_slot
    set $naive_violations = $naive_violations + 1
    printf "naive: r1 or A's TOC slot changed while C ran\n"
  end
  set $naive_returns = $naive_returns + 1
  continue
end

# After the run (the guest powers off): the totals, for the benchmark to compare.
define naive_summary
  printf "naive: %d entries, %d returns, %d violations\n", $naive_entries, $naive_returns, $naive_violations
end
