/* SPDX-License-Identifier: GPL-2.0 */
/* Internal interface between target_a.c (callers) and target_b.c (B). */
#ifndef KLP_LAB_TARGET_H
#define KLP_LAB_TARGET_H

void klp_lab_old_body(unsigned long flags);

long klp_lab_b_local(long x, unsigned long flags);
long klp_lab_b_indirect(long x, unsigned long flags);
long klp_lab_b_many_args(long a1, long a2, long a3, long a4, long a5,
			 long a6, long a7, long a8, long a9, unsigned long flags);
long klp_lab_b_varargs(unsigned long flags, int n, ...);
long klp_lab_b_sibling(long x, unsigned long flags);

#endif
