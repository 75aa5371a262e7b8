/*
 * gdbklp's recorder: the protocol between the QEMU TCG plugin
 * (libklprecord.so, klp_record.c) and its client (gdbklp/recorder.py, whose
 * docstring says the same in prose). Everything is little-endian and packed
 * (no padding anywhere).
 *
 * QEMU is started with -plugin PATH/libklprecord.so,socket=SOCKET. The plugin
 * listens on the UNIX stream socket SOCKET (a stale file is removed) and
 * serves one client at a time. It is idle until armed.
 *
 * Client -> plugin: messages, each starting with a u32 magic.
 *   ARM:    struct klp_arm, then nregisters x char[16] register names
 *           (NUL-padded; QEMU's gdb names for the vCPU: r0..r31, pc, msr, cr,
 *           lr, ctr, xer, ... on ppc64), then npoints x (struct klp_point,
 *           then nreads x struct klp_read). Replaces any earlier arming.
 *           A point's flags: KLP_POINT_FLUSH writes its records at once,
 *           with everything queued before them (a point the client must
 *           learn of now: the guest going down, the module list changing),
 *           where other records wait in a batch.
 *           Reply: one ACK record once the new instrumentation is live (the
 *           translations made before it are dropped first), or one NAK record.
 *   DISARM: u32 KLP_DISARM_MAGIC. Reply: one STATS record once no probe can
 *           fire any more (every record before it was sent).
 *   STATS:  u32 KLP_STATS_MAGIC. Reply: one STATS record.
 *
 * A read's address is (base & mask) + offset, base being the value of its
 * base source: NONE 0, REGISTER the record's register base_index, READ the
 * first 8 bytes (little-endian, zero-extended if shorter) of the point's
 * earlier read base_index. With an end source (end_kind != NONE) its length
 * is clamp(end + end_offset - address, 0, length); without, length. A read
 * whose base or end read failed is not attempted and fails too.
 *
 * Plugin -> client: records. Every record starts with struct klp_record_header
 * (size: bytes of the whole record). A probe record (point_id < 0xFFFFFFF0) is
 * of a fixed size for its point:
 *   header, u64 registers[nregisters] (each zero-extended from QEMU's bytes,
 *   which are in the vCPU's current byte order: little-endian for a ppc64le
 *   kernel), struct klp_read_result[nreads], then each read's data area of
 *   its maximum length (the first length_read bytes are the data; the rest,
 *   and all of it for a failed read, is zero).
 * Special records (vcpu_index 0xFFFFFFFF):
 *   ACK   (KLP_POINT_ACK):   the header only.
 *   STATS (KLP_POINT_STATS): header, struct klp_stats.
 *   NAK   (KLP_POINT_NAK):   header, then a UTF-8 message (size - 24 bytes):
 *           the ARM was refused and changed nothing.
 * seq counts every record (special ones too) from 0, in the order they are
 * sent.
 *
 * Back-pressure: a vCPU writes its records with blocking writes: when the
 * client reads too slowly the guest waits; no record is ever dropped while a
 * client is connected. When the client goes away (EOF, EPIPE) the plugin
 * disarms itself and says so in one line on QEMU's stderr.
 */
#ifndef KLP_RECORD_H
#define KLP_RECORD_H

#include <stdint.h>

#define KLP_ARM_MAGIC    0x4d52414bu /* "KARM" */
#define KLP_DISARM_MAGIC 0x5349444bu /* "KDIS" */
#define KLP_STATS_MAGIC  0x4154534bu /* "KSTA" */
#define KLP_RECORD_MAGIC 0x4345524bu /* "KREC" */
#define KLP_PROTOCOL_VERSION 2

#define KLP_REG_NAME_LEN 16

#define KLP_POINT_STATS 0xFFFFFFFFu
#define KLP_POINT_ACK   0xFFFFFFFEu
#define KLP_POINT_NAK   0xFFFFFFFDu
#define KLP_POINT_ID_MAX 0xFFFFFFEFu /* probe points' ids are 0..this */
#define KLP_NO_VCPU     0xFFFFFFFFu

/* struct klp_point's flags */
#define KLP_POINT_FLUSH 0x0001u
#define KLP_POINT_FLAGS KLP_POINT_FLUSH /* all that are known */

/* what an ARM may ask, at most */
#define KLP_MAX_REGISTERS 64
#define KLP_MAX_POINTS    4096
#define KLP_MAX_READS     64
#define KLP_MAX_READ_LEN  65536

enum klp_source_kind {
    KLP_SOURCE_NONE = 0,
    KLP_SOURCE_REGISTER = 1,
    KLP_SOURCE_READ = 2,
};

enum klp_read_status {
    KLP_READ_OK = 0,
    KLP_READ_FAILED = 1,
};

struct __attribute__((packed)) klp_arm {
    uint32_t magic;      /* KLP_ARM_MAGIC */
    uint32_t version;    /* KLP_PROTOCOL_VERSION */
    uint32_t nregisters;
    uint32_t npoints;
};

struct __attribute__((packed)) klp_point {
    uint64_t vaddr;      /* the guest instruction; the probe fires before it executes */
    uint32_t point_id;   /* 0..KLP_POINT_ID_MAX, unique */
    uint16_t nreads;
    uint16_t flags;      /* KLP_POINT_FLUSH */
};

struct __attribute__((packed)) klp_read {
    uint8_t base_kind;   /* enum klp_source_kind */
    uint8_t base_index;
    uint8_t end_kind;    /* enum klp_source_kind; NONE: a fixed length */
    uint8_t end_index;
    uint32_t length;     /* bytes to read; with an end, the maximum */
    uint64_t mask;
    int64_t offset;
    int64_t end_offset;
};

struct __attribute__((packed)) klp_record_header {
    uint32_t magic;      /* KLP_RECORD_MAGIC */
    uint32_t point_id;
    uint32_t vcpu_index;
    uint32_t size;       /* bytes of this whole record */
    uint64_t seq;
};

struct __attribute__((packed)) klp_read_result {
    uint64_t address;
    uint32_t length_read;
    uint32_t status;     /* enum klp_read_status */
};

struct __attribute__((packed)) klp_stats {
    uint64_t records_sent; /* probe records sent since the last ARM */
    uint64_t ns_waited;    /* ns vCPUs spent blocked writing them (the client was slow) */
    uint64_t armed_ns;     /* ns armed since the last ARM (until DISARM, or now) */
};

_Static_assert(sizeof(struct klp_arm) == 16, "klp_arm");
_Static_assert(sizeof(struct klp_point) == 16, "klp_point");
_Static_assert(sizeof(struct klp_read) == 32, "klp_read");
_Static_assert(sizeof(struct klp_record_header) == 24, "klp_record_header");
_Static_assert(sizeof(struct klp_read_result) == 16, "klp_read_result");
_Static_assert(sizeof(struct klp_stats) == 24, "klp_stats");

#endif
