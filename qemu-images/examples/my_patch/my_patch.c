// SPDX-License-Identifier: GPL-2.0
/*
 * my_patch: a live patch of your own, as the README's "Bring your own patch"
 * builds and watches it. It replaces two functions of the lab's
 * klp_lab_target module: klp_lab_b_local, called locally (`bl; nop`: the
 * trampoline must save and restore the caller's TOC) and klp_lab_b_global,
 * called from another object through a stub. Its replacements return what
 * the lab's own do, so klplab-run counts their calls as "new".
 */
#include <linux/livepatch.h>
#include <linux/module.h>
#include "klp_lab.h"

static long my_local(long x, unsigned long flags)
{
	long args[] = { x, flags };

	return klp_lab_sum(args, 2) | KLP_LAB_NEW_TAG;
}

static long my_global(long x, unsigned long flags)
{
	long args[] = { x, flags };

	return klp_lab_sum(args, 2) | KLP_LAB_NEW_TAG;
}

static struct klp_func funcs[] = {
	{ .old_name = "klp_lab_b_local", .new_func = my_local },
	{ .old_name = "klp_lab_b_global", .new_func = my_global },
	{ }
};

static struct klp_object objs[] = {
	{ .name = "klp_lab_target", .funcs = funcs },
	{ }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int __init my_patch_init(void)
{
	return klp_enable_patch(&patch);
}

static void __exit my_patch_exit(void)
{
}

module_init(my_patch_init);
module_exit(my_patch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
