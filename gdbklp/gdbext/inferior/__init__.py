"""The guest under gdb, read and written: memory and registers (target), the
vCPUs, the kernel and its modules, patches, tasks and stacks, the
trampolines' code and the out-of-line ftrace stubs. No commands, no watch.
"""
