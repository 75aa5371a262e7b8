"""gdbklp's gdb commands and convenience functions, one module each; each
registers itself when imported (gdbklp.gdbext.load imports them one by one).
"""
