// SPDX-License-Identifier: GPL-2.0
/*
 * klp_lab_patch: the live patch. It replaces every B of klp_lab_target with
 * a C that returns the same checksum under the NEW tag, so the caller sees
 * which one ran. C lives in this module, with this module's TOC: a local
 * caller's r2 must be saved and restored by the trampoline.
 */
#include <linux/delay.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/stdarg.h>
#include <linux/thread_info.h>
#include "klp_lab.h"

static unsigned int nap_ms = 1000;
module_param(nap_ms, uint, 0644);
MODULE_PARM_DESC(nap_ms, "how long C sleeps when called with the NAP flag");

/*
 * The r1 fault. C's prologue saved its return address (livepatch_handler's
 * return point) in A's frame at 16(A's r1); commit_fault() replaces it by
 * klp_lab_bad_r1_return, so C's own epilogue returns there with a correct
 * r1, and the stub returns to the handler with r1 16 bytes too high. It runs
 * with the patch module's TOC (C's), which it uses to reach the saved address.
 */
unsigned long klp_lab_saved_return;
void klp_lab_bad_r1_return(void);
asm(".pushsection .text\n"
    ".type klp_lab_bad_r1_return, @function\n"
    "klp_lab_bad_r1_return:\n"
    "	addis 12, 2, klp_lab_saved_return@toc@ha\n"
    "	ld 12, klp_lab_saved_return@toc@l(12)\n"
    "	mtlr 12\n"
    "	addi 1, 1, 16\n"
    "	blr\n"
    ".size klp_lab_bad_r1_return, . - klp_lab_bad_r1_return\n"
    ".popsection\n");

/*
 * The faults. new_body() is called straight from C, so its caller's frame
 * is C's and C's caller's frame is A's: A's r1 is two back-chain steps up.
 * The livepatch stack entry of the redirection in flight is the top one.
 */
static noinline void commit_fault(unsigned long flags)
{
	unsigned long *c_sp = *(unsigned long **)__builtin_frame_address(0);
	unsigned long *a_sp = (unsigned long *)c_sp[0];
	struct thread_info *ti = current_thread_info();
	unsigned long *entry = ti->livepatch_sp - 3;	/* [TOC, RA, magic] */
	unsigned long toc;

	asm volatile("mr %0, 2" : "=r"(toc));
	if (flags & KLP_LAB_FAULT_MAGIC)
		entry[2] = 0xdeadbeef;
	if (flags & KLP_LAB_FAULT_TOC)
		entry[0] = toc;			/* the patch module's TOC, not A's */
	if (flags & KLP_LAB_FAULT_RA)
		entry[1] += 4;			/* one instruction past the call site */
	if (flags & KLP_LAB_FAULT_TOC_SLOT)
		a_sp[3] = toc;			/* what a tail call through a stub does */
	if (flags & KLP_LAB_FAULT_R1) {
		klp_lab_saved_return = a_sp[2];
		a_sp[2] = (unsigned long)klp_lab_bad_r1_return;
	}
	if (flags & KLP_LAB_FAULT_UNBALANCED)
		ti->livepatch_sp += 3;		/* one more entry: 24 bytes */
}

static noinline void new_body(unsigned long flags)
{
	if (flags & KLP_LAB_YIELD)
		yield();
	if (flags & KLP_LAB_SLEEP)
		msleep(1);
	if (flags & KLP_LAB_NAP)
		msleep(nap_ms);
	if (flags & (KLP_LAB_FAULT_MAGIC | KLP_LAB_FAULT_TOC | KLP_LAB_FAULT_RA |
		     KLP_LAB_FAULT_R1 | KLP_LAB_FAULT_TOC_SLOT | KLP_LAB_FAULT_UNBALANCED))
		commit_fault(flags);
}

static long klp_lab_c_local(long x, unsigned long flags)
{
	long args[] = { x, flags };

	new_body(flags);
	return klp_lab_sum(args, 2) | KLP_LAB_NEW_TAG;
}

static long klp_lab_c_local_other(long x, unsigned long flags)
{
	long args[] = { x, flags };

	new_body(flags);
	return klp_lab_sum(args, 2) | KLP_LAB_NEW_TAG;
}

static long klp_lab_c_global(long x, unsigned long flags)
{
	long args[] = { x, flags };

	new_body(flags);
	return klp_lab_sum(args, 2) | KLP_LAB_NEW_TAG;
}

static long klp_lab_c_indirect(long x, unsigned long flags)
{
	long args[] = { x, flags };

	new_body(flags);
	return klp_lab_sum(args, 2) | KLP_LAB_NEW_TAG;
}

static long klp_lab_c_many_args(long a1, long a2, long a3, long a4, long a5,
			   long a6, long a7, long a8, long a9, unsigned long flags)
{
	long args[] = { a1, a2, a3, a4, a5, a6, a7, a8, a9, flags };

	new_body(flags);
	return klp_lab_sum(args, 10) | KLP_LAB_NEW_TAG;
}

static long klp_lab_c_varargs(unsigned long flags, int n, ...)
{
	long args[16] = { flags };
	va_list ap;
	int i;

	va_start(ap, n);
	for (i = 0; i < n && i < 15; i++)
		args[i + 1] = va_arg(ap, long);
	va_end(ap);
	new_body(flags);
	return klp_lab_sum(args, i + 1) | KLP_LAB_NEW_TAG;
}

/* The sibling kind's C ends with "b klp_lab_c_sibling_tail": a tail call. */
static noinline __attribute__((noipa)) long klp_lab_c_sibling_tail(long x, unsigned long flags)
{
	long args[] = { x, flags };

	return klp_lab_sum(args, 2) | KLP_LAB_NEW_TAG;
}

static long klp_lab_c_sibling(long x, unsigned long flags)
{
	new_body(flags);
	return klp_lab_c_sibling_tail(x, flags);
}

static struct klp_func funcs[] = {
	{ .old_name = "klp_lab_b_local", .new_func = klp_lab_c_local },
	{ .old_name = "klp_lab_b_local_other", .new_func = klp_lab_c_local_other },
	{ .old_name = "klp_lab_b_global", .new_func = klp_lab_c_global },
	{ .old_name = "klp_lab_b_indirect", .new_func = klp_lab_c_indirect },
	{ .old_name = "klp_lab_b_many_args", .new_func = klp_lab_c_many_args },
	{ .old_name = "klp_lab_b_varargs", .new_func = klp_lab_c_varargs },
	{ .old_name = "klp_lab_b_sibling", .new_func = klp_lab_c_sibling },
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

static int __init klp_lab_patch_init(void)
{
	return klp_enable_patch(&patch);
}

static void __exit klp_lab_patch_exit(void)
{
}

module_init(klp_lab_patch_init);
module_exit(klp_lab_patch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
MODULE_DESCRIPTION("gdbklp lab: live patch of klp_lab_target");
