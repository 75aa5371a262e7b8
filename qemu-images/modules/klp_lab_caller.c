// SPDX-License-Identifier: GPL-2.0
/*
 * klp_lab_caller: the caller A of the "global" kind. It lives in another
 * module than B, so the module loader routes its call through a stub that
 * saves r2 at 24(r1) and turns the nop after the bl into ld r2,24(r1).
 */
#include <linux/module.h>
#include "klp_lab.h"

static noinline long klp_lab_a_global(long x, unsigned long flags)
{
	return klp_lab_b_global(x, flags);
}

static int __init klp_lab_caller_init(void)
{
	return klp_lab_register_global_caller(klp_lab_a_global);
}

static void __exit klp_lab_caller_exit(void)
{
	klp_lab_register_global_caller(NULL);
}

module_init(klp_lab_caller_init);
module_exit(klp_lab_caller_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("gdbklp lab: a caller in another module");
