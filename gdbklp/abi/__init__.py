"""ppc64le ELFv2 and Linux live-patching knowledge, in pure Python.

Nothing here imports gdb: every function takes bytes, integers or small
records, so it is tested on memory images without a debugger.
"""
