// SPDX-License-Identifier: GPL-2.0
/*
 * klp_lab_target (this file: the callers A and the control files): the
 * callers A reach the functions B that the lab's live patch replaces through
 * each kind of ppc64le call site. The B of most kinds live in target_b.c, a
 * separate translation unit of the same module: the compiler cannot know
 * they bind locally, so it emits "bl B; nop", and the module loader, finding
 * B in the same module (same TOC), branches directly and keeps the nop.
 * local_other's B is static here, so its call is a bare "bl B" followed by
 * whatever instruction comes next.
 *
 * User space drives it through /proc/klp_lab:
 *   echo "KIND COUNT [FLAGS]" > /proc/klp_lab/run   runs COUNT calls of KIND
 *                                                   on the writing task
 *   cat /proc/klp_lab/counts                        per kind: calls old new bad
 *   echo reset > /proc/klp_lab/counts               zeroes the counters
 *
 * The callers are built with -fno-optimize-sibling-calls so that every A really
 * calls its B (a tail call would be a branch, not a call site).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/delay.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/proc_fs.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/uaccess.h>
#include <linux/stdarg.h>
#include "klp_lab.h"
#include "target.h"

unsigned int klp_lab_hold_ms = 2000;
module_param_named(hold_ms, klp_lab_hold_ms, uint, 0644);
MODULE_PARM_DESC(hold_ms, "how long B sleeps when called with the HOLD flag");

void klp_lab_old_body(unsigned long flags)
{
	if (flags & KLP_LAB_HOLD)
		msleep(klp_lab_hold_ms);
}

static const char *const kind_names[KLP_LAB_NR_KINDS] = {
	[KLP_LAB_LOCAL] = "local",
	[KLP_LAB_LOCAL_OTHER] = "local_other",
	[KLP_LAB_GLOBAL] = "global",
	[KLP_LAB_INDIRECT] = "indirect",
	[KLP_LAB_MANY_ARGS] = "many_args",
	[KLP_LAB_VARARGS] = "varargs",
	[KLP_LAB_SIBLING] = "sibling",
};

struct klp_lab_counts {
	atomic64_t calls, old, new, bad;
};
static struct klp_lab_counts counts[KLP_LAB_NR_KINDS];

/* ---- B of the local_other kind: static, in the callers' file ------- */

/* Static and never inlined or cloned: callers branch to it with a bare bl. */
static noinline __attribute__((noipa)) long klp_lab_b_local_other(long x, unsigned long flags)
{
	long args[] = { x, flags };

	klp_lab_old_body(flags);
	return klp_lab_sum(args, 2) | KLP_LAB_OLD_TAG;
}

/* ---- the callers A ----------------------------------------------------- */

static long (*volatile klp_lab_b_indirect_ptr)(long, unsigned long) = klp_lab_b_indirect;
static klp_lab_caller_fn global_caller;

noinline long klp_lab_a_local(long x, unsigned long flags)
{
	return klp_lab_b_local(x, flags);
}

noinline long klp_lab_a_local_other(long x, unsigned long flags)
{
	return klp_lab_b_local_other(x, flags) + 0;
}

noinline long klp_lab_a_indirect(long x, unsigned long flags)
{
	return klp_lab_b_indirect_ptr(x, flags);
}

noinline long klp_lab_a_many_args(long x, unsigned long flags)
{
	return klp_lab_b_many_args(x, x + 1, x + 2, x + 3, x + 4, x + 5, x + 6, x + 7, x + 8, flags);
}

noinline long klp_lab_a_varargs(long x, unsigned long flags)
{
	return klp_lab_b_varargs(flags, 9, x, x + 1, x + 2, x + 3, x + 4, x + 5, x + 6, x + 7, x + 8);
}

noinline long klp_lab_a_sibling(long x, unsigned long flags)
{
	return klp_lab_b_sibling(x, flags);
}

/* The global caller lives in klp_lab_caller.ko, which depends on us. */
int klp_lab_register_global_caller(klp_lab_caller_fn fn)
{
	WRITE_ONCE(global_caller, fn);
	return 0;
}
EXPORT_SYMBOL_GPL(klp_lab_register_global_caller);

/* The checksum B and C must both return for argument x of @kind. */
static unsigned long expected_sum(int kind, long x, unsigned long flags)
{
	long args[10];
	int i;

	switch (kind) {
	case KLP_LAB_MANY_ARGS:
		for (i = 0; i < 9; i++)
			args[i] = x + i;
		args[9] = flags;
		return klp_lab_sum(args, 10);
	case KLP_LAB_VARARGS:
		args[0] = flags;
		for (i = 0; i < 9; i++)
			args[i + 1] = x + i;
		return klp_lab_sum(args, 10);
	default:
		args[0] = x;
		args[1] = flags;
		return klp_lab_sum(args, 2);
	}
}

static long call_kind(int kind, long x, unsigned long flags)
{
	klp_lab_caller_fn caller;

	switch (kind) {
	case KLP_LAB_LOCAL:
		return klp_lab_a_local(x, flags);
	case KLP_LAB_LOCAL_OTHER:
		return klp_lab_a_local_other(x, flags);
	case KLP_LAB_GLOBAL:
		caller = READ_ONCE(global_caller);
		return caller ? caller(x, flags) : -ENODEV;
	case KLP_LAB_INDIRECT:
		return klp_lab_a_indirect(x, flags);
	case KLP_LAB_MANY_ARGS:
		return klp_lab_a_many_args(x, flags);
	case KLP_LAB_VARARGS:
		return klp_lab_a_varargs(x, flags);
	case KLP_LAB_SIBLING:
		return klp_lab_a_sibling(x, flags);
	}
	return -EINVAL;
}

static int run_calls(int kind, unsigned long count, unsigned long flags)
{
	unsigned long i;

	if (kind == KLP_LAB_GLOBAL && !READ_ONCE(global_caller))
		return -ENODEV;
	for (i = 0; i < count; i++) {
		long x = (long)((current->pid << 16) + i);
		unsigned long r = call_kind(kind, x, flags);
		unsigned long tag = r & KLP_LAB_TAG_MASK;

		atomic64_inc(&counts[kind].calls);
		if ((r & ~KLP_LAB_TAG_MASK) != expected_sum(kind, x, flags))
			tag = 0;
		if (tag == KLP_LAB_OLD_TAG) {
			atomic64_inc(&counts[kind].old);
		} else if (tag == KLP_LAB_NEW_TAG) {
			atomic64_inc(&counts[kind].new);
		} else {
			atomic64_inc(&counts[kind].bad);
			pr_err_ratelimited("%s: call %lu returned %#lx, expected sum %#lx\n",
					   kind_names[kind], i, r, expected_sum(kind, x, flags));
		}
		cond_resched();
	}
	return 0;
}

static int kind_from_name(const char *name)
{
	int kind;

	for (kind = 0; kind < KLP_LAB_NR_KINDS; kind++)
		if (!strcmp(name, kind_names[kind]))
			return kind;
	return -EINVAL;
}

static ssize_t run_write(struct file *file, const char __user *ubuf,
			 size_t len, loff_t *ppos)
{
	char buf[64], name[24];
	unsigned long count, flags = 0;
	int kind, ret;

	if (len >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, len))
		return -EFAULT;
	buf[len] = '\0';
	if (sscanf(buf, "%23s %lu %li", name, &count, &flags) < 2)
		return -EINVAL;
	kind = kind_from_name(name);
	if (kind < 0)
		return kind;
	ret = run_calls(kind, count, flags);
	return ret ? ret : len;
}

static int counts_show(struct seq_file *m, void *v)
{
	int kind;

	seq_puts(m, "kind calls old new bad\n");
	for (kind = 0; kind < KLP_LAB_NR_KINDS; kind++)
		seq_printf(m, "%s %lld %lld %lld %lld\n", kind_names[kind],
			   atomic64_read(&counts[kind].calls),
			   atomic64_read(&counts[kind].old),
			   atomic64_read(&counts[kind].new),
			   atomic64_read(&counts[kind].bad));
	return 0;
}

static int counts_open(struct inode *inode, struct file *file)
{
	return single_open(file, counts_show, NULL);
}

static ssize_t counts_write(struct file *file, const char __user *ubuf,
			    size_t len, loff_t *ppos)
{
	int kind;

	for (kind = 0; kind < KLP_LAB_NR_KINDS; kind++) {
		atomic64_set(&counts[kind].calls, 0);
		atomic64_set(&counts[kind].old, 0);
		atomic64_set(&counts[kind].new, 0);
		atomic64_set(&counts[kind].bad, 0);
	}
	return len;
}

static const struct proc_ops run_ops = {
	.proc_write = run_write,
};

static const struct proc_ops counts_ops = {
	.proc_open = counts_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
	.proc_write = counts_write,
};

static struct proc_dir_entry *proc_dir;

static int __init klp_lab_target_init(void)
{
	proc_dir = proc_mkdir("klp_lab", NULL);
	if (!proc_dir)
		return -ENOMEM;
	if (!proc_create("run", 0200, proc_dir, &run_ops) ||
	    !proc_create("counts", 0600, proc_dir, &counts_ops)) {
		proc_remove(proc_dir);
		return -ENOMEM;
	}
	return 0;
}

static void __exit klp_lab_target_exit(void)
{
	proc_remove(proc_dir);
}

module_init(klp_lab_target_init);
module_exit(klp_lab_target_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("gdbklp lab: patched functions and their callers");
