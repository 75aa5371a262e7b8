/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared definitions of the gdbklp lab modules.
 *
 * Every patched function B and its replacement C compute the same checksum of
 * their arguments and differ only in the tag they add, so the caller A can
 * tell from the result alone whether B or C ran and whether C received every
 * argument intact.
 */
#ifndef KLP_LAB_H
#define KLP_LAB_H

enum klp_lab_kind {
	KLP_LAB_LOCAL,		/* bl B; nop                  (same object)      */
	KLP_LAB_LOCAL_OTHER,	/* bl B; <not a nop>         (static callee)    */
	KLP_LAB_GLOBAL,		/* bl stub; ld r2,24(r1)     (other module)     */
	KLP_LAB_INDIRECT,	/* bctrl; ld r2,24(r1)       (function pointer) */
	KLP_LAB_MANY_ARGS,	/* 10 arguments: two on the stack              */
	KLP_LAB_VARARGS,	/* variadic                                    */
	KLP_LAB_SIBLING,	/* C ends with a tail call                     */
	KLP_LAB_NR_KINDS,
};

/* Per-call flags, written by user space with the call count. */
#define KLP_LAB_YIELD	0x1	/* C yields the CPU once (may migrate)           */
#define KLP_LAB_SLEEP	0x2	/* C sleeps 1 ms (migrates between vCPUs)        */
#define KLP_LAB_HOLD	0x4	/* B sleeps hold_ms: holds a transition back    */
#define KLP_LAB_NAP	0x8	/* C sleeps nap_ms: a task asleep inside C       */

/*
 * Faults C commits on request, each breaking one redirection invariant the
 * way a broken trampoline or replacement would (numbers from
 * docs/invariants.md).
 */
#define KLP_LAB_FAULT_MAGIC	0x010	/* 8: overwrite its entry's STACK_END_MAGIC  */
#define KLP_LAB_FAULT_TOC	0x020	/* 7/9: overwrite the saved TOC             */
#define KLP_LAB_FAULT_RA	0x040	/* 7/9: overwrite the saved return address  */
#define KLP_LAB_FAULT_R1	0x080	/* 9: return to the handler with r1 + 16    */
#define KLP_LAB_FAULT_TOC_SLOT	0x100	/* 3: clobber 24(A's r1), A's TOC save slot */
#define KLP_LAB_FAULT_UNBALANCED 0x200	/* 10: leave livepatch_sp 24 bytes higher   */

#define KLP_LAB_OLD_TAG	0x0100000000000000UL
#define KLP_LAB_NEW_TAG	0x0200000000000000UL
#define KLP_LAB_TAG_MASK 0xff00000000000000UL

/* Weighted sum: a swapped, shifted or lost argument changes the result. */
static inline unsigned long klp_lab_sum(const long *args, int n)
{
	unsigned long sum = 0;
	int i;

	for (i = 0; i < n; i++)
		sum += (unsigned long)(i + 1) * (unsigned long)args[i];
	return sum & ~KLP_LAB_TAG_MASK;
}

typedef long (*klp_lab_caller_fn)(long x, unsigned long flags);

int klp_lab_register_global_caller(klp_lab_caller_fn fn);
long klp_lab_b_global(long x, unsigned long flags);

#endif
