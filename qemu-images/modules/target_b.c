// SPDX-License-Identifier: GPL-2.0
/*
 * klp_lab_target, the patched functions B (old versions) called from
 * target_a.c. Kept in their own translation unit: see target_a.c.
 */
#include <linux/export.h>
#include <linux/stdarg.h>
#include "klp_lab.h"
#include "target.h"

noinline long klp_lab_b_local(long x, unsigned long flags)
{
	long args[] = { x, flags };

	klp_lab_old_body(flags);
	return klp_lab_sum(args, 2) | KLP_LAB_OLD_TAG;
}

noinline long klp_lab_b_global(long x, unsigned long flags)
{
	long args[] = { x, flags };

	klp_lab_old_body(flags);
	return klp_lab_sum(args, 2) | KLP_LAB_OLD_TAG;
}
EXPORT_SYMBOL_GPL(klp_lab_b_global);

noinline long klp_lab_b_indirect(long x, unsigned long flags)
{
	long args[] = { x, flags };

	klp_lab_old_body(flags);
	return klp_lab_sum(args, 2) | KLP_LAB_OLD_TAG;
}

noinline long klp_lab_b_many_args(long a1, long a2, long a3, long a4, long a5,
			     long a6, long a7, long a8, long a9, unsigned long flags)
{
	long args[] = { a1, a2, a3, a4, a5, a6, a7, a8, a9, flags };

	klp_lab_old_body(flags);
	return klp_lab_sum(args, 10) | KLP_LAB_OLD_TAG;
}

noinline long klp_lab_b_varargs(unsigned long flags, int n, ...)
{
	long args[16] = { flags };
	va_list ap;
	int i;

	va_start(ap, n);
	for (i = 0; i < n && i < 15; i++)
		args[i + 1] = va_arg(ap, long);
	va_end(ap);
	klp_lab_old_body(flags);
	return klp_lab_sum(args, i + 1) | KLP_LAB_OLD_TAG;
}

noinline long klp_lab_b_sibling(long x, unsigned long flags)
{
	long args[] = { x, flags };

	klp_lab_old_body(flags);
	return klp_lab_sum(args, 2) | KLP_LAB_OLD_TAG;
}

