/*
 * libklprecord.so: gdbklp's recorder, a QEMU TCG plugin (plugin API 4, QEMU
 * 10.0). At the guest instructions a client arms (probe points) it records,
 * for every vCPU and before the instruction executes, a set of registers and
 * memory reads, and streams them as fixed-size records to the client over a
 * UNIX socket: no gdbstub stop. The protocol is in klp_record.h.
 *
 *   qemu-system-ppc64 ... -plugin libklprecord.so,socket=PATH[,list_registers=on]
 *
 * Idle, it costs a translation callback per new translation block and a
 * plain call of on_change_point() in one block in KLP_CHANGE_SAMPLE. Arming
 * and disarming must drop the translations made before them (a probe lives
 * in the translated code). Plugin API 4 drops translations only through
 * qemu_plugin_reset(), which flushes them only when called from a vCPU
 * thread (from any other thread it only unregisters the callbacks), and
 * with one TCG thread (-accel tcg,thread=single) no idle or resume callback
 * ever runs. So the control thread raises change_wanted and waits; the
 * first vCPU that executes a sampled block calls qemu_plugin_reset(), and
 * the reset's callback (all vCPUs stopped, every translation gone) makes the
 * new arming live, registers the callbacks again and writes the reply,
 * before any vCPU runs again: no record can come before its ACK, none after
 * its DISARM's stats.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <glib.h>
#include <qemu-plugin.h>

#include "klp_record.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

struct config;

struct read_spec {
    struct klp_read r;
    uint32_t data_offset; /* of its data area in the record */
};

struct point_spec {
    uint64_t vaddr;
    uint32_t id;
    uint32_t nreads;
    bool flush;           /* KLP_POINT_FLUSH: written at once */
    uint32_t size;        /* of its records */
    uint32_t results_offset;
    struct read_spec *reads;
    struct config *cfg;
};

struct config {
    uint32_t nregs;
    struct qemu_plugin_register **handles;
    uint32_t npoints;
    struct point_spec *points;
    GHashTable *by_vaddr; /* uint64_t vaddr -> struct point_spec */
};

enum reply { REPLY_NONE, REPLY_ACK, REPLY_STATS };

static qemu_plugin_id_t plugin_id;
static char *socket_path;
static int listen_fd = -1;
static bool list_registers;

/*
 * Arming. live is read by vCPUs without a lock: it changes only in the
 * reset callback, when no vCPU runs and no translation is left.
 */
static pthread_mutex_t cfg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cfg_cond = PTHREAD_COND_INITIALIZER;
static GArray *known_regs;      /* qemu_plugin_reg_descriptor, of the first vCPU */
static struct config *live;
static struct config *pending;  /* made live by the next reset (NULL: disarmed) */
static enum reply pending_reply;
static uint64_t changes_done;

/* The client and the counts: write_lock. */
static pthread_mutex_t write_lock = PTHREAD_MUTEX_INITIALIZER;
static int client_fd = -1;
static bool client_broken;      /* a write failed: the client is gone */
static uint64_t next_seq;
static uint64_t records_sent, ns_waited, armed_at, armed_ns;

static void register_callbacks(qemu_plugin_id_t id);

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static uint64_t le_value(const uint8_t *bytes, size_t len)
{
    uint64_t v = 0;
    for (size_t i = 0; i < len && i < 8; i++) {
        v |= (uint64_t)bytes[i] << (8 * i);
    }
    return v;
}

/* ---- writing to the client (write_lock held) ---------------------------- */

/*
 * Records are gathered in out_buf and written when it holds KLP_BATCH bytes,
 * before a special record, and by the control thread every millisecond: a
 * write per record would cost a system call and a socket buffer each.
 */
#define KLP_BATCH (64 * 1024)
static uint8_t *out_buf;
static size_t out_len, out_cap;

/*
 * Write out_buf. block: a vCPU waits until the client has taken it all
 * (counted in ns_waited); else (the control thread) what the socket takes now.
 */
static bool flush_locked(bool block)
{
    size_t done = 0;
    bool ok = true;
    while (done < out_len) {
        if (client_fd < 0 || client_broken) {
            ok = false;
            break;
        }
        ssize_t n = send(client_fd, out_buf + done, out_len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            done += n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!block) {
                break;
            }
            /* the client is behind: the guest waits for it */
            struct pollfd pfd = { .fd = client_fd, .events = POLLOUT };
            uint64_t start = now_ns();
            int r = poll(&pfd, 1, -1);
            ns_waited += now_ns() - start;
            if (r < 0 && errno != EINTR) {
                client_broken = true;
            }
        } else {
            client_broken = true;
        }
    }
    if (!ok) {
        out_len = 0; /* nobody to send it to */
    } else if (done) {
        memmove(out_buf, out_buf + done, out_len - done);
        out_len -= done;
    }
    return ok;
}

/* Queue a record (a vCPU's: it may wait for the client); false if the client is gone. */
static bool queue_locked(const void *data, size_t len, bool flush)
{
    if (client_fd < 0 || client_broken) {
        return false;
    }
    if (out_len + len > out_cap) {
        if (!flush_locked(true)) {
            return false;
        }
        if (len > out_cap) {
            out_cap = len > 2 * KLP_BATCH ? len : 2 * KLP_BATCH;
            out_buf = g_realloc(out_buf, out_cap);
        }
    }
    memcpy(out_buf + out_len, data, len);
    out_len += len;
    if (flush || out_len >= KLP_BATCH) {
        return flush_locked(true);
    }
    return true;
}

static void header(void *buf, uint32_t point, uint32_t vcpu, uint32_t size)
{
    struct klp_record_header h = { KLP_RECORD_MAGIC, point, vcpu, size, 0 };
    memcpy(buf, &h, sizeof(h));
}

static void send_special_locked(uint32_t point, const void *body, uint32_t len)
{
    uint8_t buf[sizeof(struct klp_record_header) + 1024];
    if (len > 1024) {
        len = 1024;
    }
    header(buf, point, KLP_NO_VCPU, sizeof(struct klp_record_header) + len);
    ((struct klp_record_header *)buf)->seq = next_seq++;
    memcpy(buf + sizeof(struct klp_record_header), body, len);
    queue_locked(buf, sizeof(struct klp_record_header) + len, true);
}

static void send_stats_locked(void)
{
    struct klp_stats s = { records_sent, ns_waited, armed_ns };
    if (live) {
        s.armed_ns += now_ns() - armed_at;
    }
    send_special_locked(KLP_POINT_STATS, &s, sizeof(s));
}

static void send_nak(const char *message)
{
    pthread_mutex_lock(&write_lock);
    send_special_locked(KLP_POINT_NAK, message, strlen(message));
    pthread_mutex_unlock(&write_lock);
}

/* ---- the probes ----------------------------------------------------------- */

static __thread uint8_t *record_buf;
static __thread size_t record_cap;
static __thread GByteArray *scratch;

static bool source_value(uint8_t kind, uint8_t index, const uint64_t *regs, const uint64_t *values,
                         const bool *ok, uint64_t *out)
{
    switch (kind) {
    case KLP_SOURCE_REGISTER:
        *out = regs[index];
        return true;
    case KLP_SOURCE_READ:
        *out = values[index];
        return ok[index];
    default:
        *out = 0;
        return true;
    }
}

static void on_probe(unsigned int vcpu, void *udata)
{
    struct point_spec *p = udata;
    struct config *c = p->cfg;
    uint64_t values[KLP_MAX_READS];
    bool ok[KLP_MAX_READS];

    if (c != live || client_broken) {
        return;
    }
    if (record_cap < p->size) {
        record_buf = g_realloc(record_buf, p->size);
        record_cap = p->size;
    }
    if (!scratch) {
        scratch = g_byte_array_new();
    }
    uint8_t *buf = record_buf;
    memset(buf, 0, p->size);
    header(buf, p->id, vcpu, p->size);
    uint64_t *regs = (uint64_t *)(buf + sizeof(struct klp_record_header));
    for (uint32_t i = 0; i < c->nregs; i++) {
        g_byte_array_set_size(scratch, 0);
        int n = qemu_plugin_read_register(c->handles[i], scratch);
        regs[i] = n > 0 ? le_value(scratch->data, n) : 0;
    }
    struct klp_read_result *results = (struct klp_read_result *)(buf + p->results_offset);
    for (uint32_t j = 0; j < p->nreads; j++) {
        const struct klp_read *r = &p->reads[j].r;
        uint64_t base, end;
        bool good = source_value(r->base_kind, r->base_index, regs, values, ok, &base);
        uint64_t address = (base & r->mask) + (uint64_t)r->offset;
        uint32_t len = r->length;
        if (r->end_kind != KLP_SOURCE_NONE) {
            good = source_value(r->end_kind, r->end_index, regs, values, ok, &end) && good;
            int64_t span = (int64_t)(end + (uint64_t)r->end_offset - address);
            len = span < 0 ? 0 : (uint64_t)span > r->length ? r->length : (uint32_t)span;
        }
        uint8_t *area = buf + p->reads[j].data_offset;
        if (good && len) {
            good = qemu_plugin_read_memory_vaddr(address, scratch, len);
            if (good) {
                memcpy(area, scratch->data, len);
            }
        }
        results[j].address = address;
        results[j].length_read = good ? len : 0;
        results[j].status = good ? KLP_READ_OK : KLP_READ_FAILED;
        ok[j] = good;
        values[j] = good ? le_value(area, len) : 0;
    }
    pthread_mutex_lock(&write_lock);
    ((struct klp_record_header *)buf)->seq = next_seq++;
    if (queue_locked(buf, p->size, p->flush)) {
        records_sent++;
    }
    pthread_mutex_unlock(&write_lock);
}

/* ---- changing the arming --------------------------------------------------- */

static void free_config(struct config *c)
{
    if (!c) {
        return;
    }
    for (uint32_t i = 0; i < c->npoints; i++) {
        g_free(c->points[i].reads);
    }
    g_free(c->points);
    g_free(c->handles);
    if (c->by_vaddr) {
        g_hash_table_destroy(c->by_vaddr);
    }
    g_free(c);
}

/* The reset's callback: every vCPU stopped, every translation dropped. */
static void after_reset(qemu_plugin_id_t id)
{
    register_callbacks(id);
    pthread_mutex_lock(&cfg_lock);
    struct config *old = live;
    pthread_mutex_lock(&write_lock);
    uint64_t now = now_ns();
    if (old) {
        armed_ns += now - armed_at;
    }
    live = pending;
    pending = NULL;
    if (live) {
        records_sent = ns_waited = armed_ns = 0;
        armed_at = now;
    }
    if (pending_reply == REPLY_ACK) {
        send_special_locked(KLP_POINT_ACK, NULL, 0);
    } else if (pending_reply == REPLY_STATS) {
        send_stats_locked();
    }
    pthread_mutex_unlock(&write_lock);
    changes_done++;
    pthread_cond_broadcast(&cfg_cond);
    pthread_mutex_unlock(&cfg_lock);
    free_config(old);
}

/* A vCPU found the change flag raised (an inline compare in every block). */
/*
 * A change waits for a vCPU. Plugin API 4's conditional callbacks would
 * cost one inline compare per block, but QEMU 10.0 mistranslates the ppc64
 * kernel with them (it hangs right after the firmware), and a plain call
 * in every block costs 14% on the hot workload: one block in
 * KLP_CHANGE_SAMPLE (chosen by its address) calls on_change_point.
 */
#define KLP_CHANGE_SAMPLE 16
static int change_wanted;

static bool change_point(uint64_t vaddr)
{
    return ((vaddr >> 2) * 0x9E3779B97F4A7C15ull) >> 60 == 0;
}

static void on_change_point(unsigned int vcpu, void *udata)
{
    if (__atomic_load_n(&change_wanted, __ATOMIC_RELAXED) &&
        __atomic_exchange_n(&change_wanted, 0, __ATOMIC_SEQ_CST)) {
        qemu_plugin_reset(plugin_id, after_reset);
    }
}

/*
 * Make cfg live (NULL: disarm) and send reply once it is; wait for it.
 * Returns whether anything was armed before.
 */
static bool change(struct config *cfg, enum reply reply)
{
    pthread_mutex_lock(&cfg_lock);
    bool was_armed = live != NULL;
    if (!cfg && !live) {
        pthread_mutex_unlock(&cfg_lock);
        if (reply == REPLY_STATS) {
            pthread_mutex_lock(&write_lock);
            send_stats_locked();
            pthread_mutex_unlock(&write_lock);
        }
        return false;
    }
    pending = cfg;
    pending_reply = reply;
    uint64_t target = changes_done + 1;
    __atomic_store_n(&change_wanted, 1, __ATOMIC_SEQ_CST);
    while (changes_done < target) {
        pthread_cond_wait(&cfg_cond, &cfg_lock);
    }
    pthread_mutex_unlock(&cfg_lock);
    return was_armed;
}

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    if (change_point(qemu_plugin_tb_vaddr(tb))) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_change_point, QEMU_PLUGIN_CB_NO_REGS, NULL);
    }
    struct config *c = live;
    if (!c) {
        return;
    }
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t vaddr = qemu_plugin_insn_vaddr(insn);
        struct point_spec *p = g_hash_table_lookup(c->by_vaddr, &vaddr);
        if (p) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_probe, QEMU_PLUGIN_CB_R_REGS, p);
        }
    }
}

static void on_vcpu_init(qemu_plugin_id_t id, unsigned int vcpu)
{
    pthread_mutex_lock(&cfg_lock);
    if (!known_regs) {
        known_regs = qemu_plugin_get_registers();
        if (list_registers) {
            GString *s = g_string_new("klprecord: registers:");
            for (guint i = 0; i < known_regs->len; i++) {
                g_string_append_printf(s, " %s", g_array_index(known_regs, qemu_plugin_reg_descriptor, i).name);
            }
            fprintf(stderr, "%s\n", s->str);
            g_string_free(s, TRUE);
        }
    }
    pthread_mutex_unlock(&cfg_lock);
}

static void on_exit_cb(qemu_plugin_id_t id, void *p)
{
    if (socket_path) {
        unlink(socket_path);
    }
}

static void register_callbacks(qemu_plugin_id_t id)
{
    qemu_plugin_register_vcpu_init_cb(id, on_vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
    qemu_plugin_register_atexit_cb(id, on_exit_cb, NULL);
}

/* ---- the control thread ---------------------------------------------------- */

static bool read_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = recv(fd, p, len, 0);
        if (n > 0) {
            p += n;
            len -= n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            return false;
        }
    }
    return true;
}

static struct qemu_plugin_register *register_named(const char *name)
{
    for (guint i = 0; known_regs && i < known_regs->len; i++) {
        qemu_plugin_reg_descriptor *d = &g_array_index(known_regs, qemu_plugin_reg_descriptor, i);
        if (strcmp(d->name, name) == 0) {
            return d->handle;
        }
    }
    return NULL;
}

static void known_names(GString *s)
{
    for (guint i = 0; known_regs && i < known_regs->len && s->len < 900; i++) {
        g_string_append_printf(s, "%s%s", i ? " " : "",
                               g_array_index(known_regs, qemu_plugin_reg_descriptor, i).name);
    }
}

static const char *kind_error(uint8_t kind, uint8_t index, uint32_t nregs, uint32_t read)
{
    switch (kind) {
    case KLP_SOURCE_NONE:
        return NULL;
    case KLP_SOURCE_REGISTER:
        return index < nregs ? NULL : "names no register of the arming";
    case KLP_SOURCE_READ:
        return index < read ? NULL : "names no earlier read of its point";
    default:
        return "has an unknown source kind";
    }
}

/*
 * Read one ARM (its magic already read) and arm it. Returns false when the
 * connection must end (the message cannot be framed, or the client left).
 */
static bool handle_arm(int fd)
{
    struct klp_arm h;
    GString *error = g_string_new(NULL);
    struct config *c = g_new0(struct config, 1);
    bool framed = false;

    if (!read_full(fd, (uint8_t *)&h + 4, sizeof(h) - 4)) {
        goto out;
    }
    if (h.version != KLP_PROTOCOL_VERSION || h.nregisters > KLP_MAX_REGISTERS || h.npoints > KLP_MAX_POINTS) {
        g_string_printf(error, "ARM version %u with %u registers and %u points: this plugin takes version %u, "
                        "at most %u registers and %u points", h.version, h.nregisters, h.npoints,
                        KLP_PROTOCOL_VERSION, KLP_MAX_REGISTERS, KLP_MAX_POINTS);
        goto out;
    }
    c->nregs = h.nregisters;
    c->handles = g_new0(struct qemu_plugin_register *, h.nregisters ? h.nregisters : 1);
    pthread_mutex_lock(&cfg_lock);
    for (uint32_t i = 0; i < h.nregisters; i++) {
        char name[KLP_REG_NAME_LEN + 1] = { 0 };
        if (!read_full(fd, name, KLP_REG_NAME_LEN)) {
            pthread_mutex_unlock(&cfg_lock);
            goto out;
        }
        c->handles[i] = register_named(name);
        if (!c->handles[i] && !error->len) {
            g_string_printf(error, "the vCPU has no register '%s' (it has: ", name);
            known_names(error);
            g_string_append(error, ")");
        }
    }
    pthread_mutex_unlock(&cfg_lock);
    c->npoints = h.npoints;
    c->points = g_new0(struct point_spec, h.npoints ? h.npoints : 1);
    c->by_vaddr = g_hash_table_new(g_int64_hash, g_int64_equal);
    for (uint32_t i = 0; i < h.npoints; i++) {
        struct klp_point kp;
        struct point_spec *p = &c->points[i];
        if (!read_full(fd, &kp, sizeof(kp))) {
            goto out;
        }
        if (kp.nreads > KLP_MAX_READS) {
            g_string_printf(error, "point %u has %u reads, at most %u are allowed", kp.point_id, kp.nreads,
                            KLP_MAX_READS);
            goto out;
        }
        if (kp.flags & ~KLP_POINT_FLAGS) {
            g_string_printf(error, "point %u has unknown flags %#x", kp.point_id, kp.flags & ~KLP_POINT_FLAGS);
            goto out;
        }
        p->vaddr = kp.vaddr;
        p->id = kp.point_id;
        p->nreads = kp.nreads;
        p->flush = kp.flags & KLP_POINT_FLUSH;
        p->cfg = c;
        p->reads = g_new0(struct read_spec, kp.nreads ? kp.nreads : 1);
        p->results_offset = sizeof(struct klp_record_header) + 8 * c->nregs;
        uint64_t size = p->results_offset + sizeof(struct klp_read_result) * (uint64_t)kp.nreads;
        for (uint32_t j = 0; j < kp.nreads; j++) {
            struct klp_read *r = &p->reads[j].r;
            if (!read_full(fd, r, sizeof(*r))) {
                goto out;
            }
            const char *why = kind_error(r->base_kind, r->base_index, c->nregs, j);
            const char *end_why = kind_error(r->end_kind, r->end_index, c->nregs, j);
            if (error->len) {
                continue;
            } else if (why || end_why) {
                g_string_printf(error, "read %u of point %u: its %s %s", j, p->id, why ? "base" : "end",
                                why ? why : end_why);
            } else if (r->length > KLP_MAX_READ_LEN) {
                g_string_printf(error, "read %u of point %u: %u bytes, at most %u are allowed", j, p->id,
                                r->length, KLP_MAX_READ_LEN);
            }
        }
        for (uint32_t j = 0; j < kp.nreads; j++) {
            p->reads[j].data_offset = size;
            size += p->reads[j].r.length;
        }
        p->size = size;
        if (error->len) {
            continue;
        }
        if (p->id > KLP_POINT_ID_MAX) {
            g_string_printf(error, "point id %#x is reserved (ids are 0 to %#x)", p->id, KLP_POINT_ID_MAX);
        } else if (g_hash_table_contains(c->by_vaddr, &p->vaddr)) {
            g_string_printf(error, "two points at %#" PRIx64, p->vaddr);
        } else if (size > (1u << 24)) {
            g_string_printf(error, "point %u: records of %" PRIu64 " bytes are too large", p->id, size);
        } else {
            g_hash_table_insert(c->by_vaddr, &p->vaddr, p);
        }
    }
    framed = true;
    if (!error->len) {
        pthread_mutex_lock(&cfg_lock);
        bool no_vcpu = known_regs == NULL;
        pthread_mutex_unlock(&cfg_lock);
        if (no_vcpu) {
            g_string_printf(error, "no vCPU is initialised yet");
        }
    }
out:
    if (error->len) {
        send_nak(error->str);
    }
    if (!error->len && framed) {
        change(c, REPLY_ACK);
    } else {
        free_config(c);
    }
    g_string_free(error, TRUE);
    return framed;
}

/* Serve one client until it leaves; returns whether it left armed. */
static void serve(int fd)
{
    uint32_t magic;
    for (;;) {
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        pthread_mutex_lock(&write_lock);
        bool waiting = out_len > 0 || live;
        pthread_mutex_unlock(&write_lock);
        int r = poll(&pfd, 1, waiting ? 1 : 50);
        if (r == 0 || (r < 0 && errno == EINTR)) {
            pthread_mutex_lock(&write_lock);
            flush_locked(false);
            pthread_mutex_unlock(&write_lock);
            continue;
        }
        if (!read_full(fd, &magic, sizeof(magic))) {
            break;
        }
        if (magic == KLP_ARM_MAGIC) {
            if (!handle_arm(fd)) {
                return;
            }
        } else if (magic == KLP_DISARM_MAGIC) {
            change(NULL, REPLY_STATS);
        } else if (magic == KLP_STATS_MAGIC) {
            pthread_mutex_lock(&write_lock);
            send_stats_locked();
            pthread_mutex_unlock(&write_lock);
        } else {
            char msg[80];
            snprintf(msg, sizeof(msg), "unknown message %#x", magic);
            send_nak(msg);
            return;
        }
    }
}

static void *control_thread(void *arg)
{
    for (;;) {
        int fd = accept(listen_fd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) {
                continue;
            }
            fprintf(stderr, "klprecord: accept on %s failed: %s; no more clients\n", socket_path,
                    strerror(errno));
            return NULL;
        }
        pthread_mutex_lock(&write_lock);
        client_fd = fd;
        client_broken = false;
        out_len = 0;
        pthread_mutex_unlock(&write_lock);
        serve(fd);
        pthread_mutex_lock(&write_lock);
        client_broken = true; /* a vCPU blocked writing to it gets EPIPE; none writes again */
        shutdown(fd, SHUT_RDWR);
        pthread_mutex_unlock(&write_lock);
        bool was_armed = change(NULL, REPLY_NONE);
        pthread_mutex_lock(&write_lock);
        uint64_t sent = records_sent;
        close(fd);
        client_fd = -1;
        pthread_mutex_unlock(&write_lock);
        if (was_armed) {
            fprintf(stderr, "klprecord: the client went away: disarmed after %" PRIu64 " records\n", sent);
        }
    }
    return NULL;
}

static int listen_on(const char *path)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "klprecord: socket path too long: %s\n", path);
        return -1;
    }
    strcpy(addr.sun_path, path);
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        unlink(path); /* a stale socket of an earlier QEMU */
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || chmod(path, 0600) < 0 ||
        listen(fd, 1) < 0) {
        fprintf(stderr, "klprecord: cannot listen on %s: %s\n", path, strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    return fd;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    plugin_id = id;
    for (int i = 0; i < argc; i++) {
        char *value = strchr(argv[i], '=');
        if (value && strncmp(argv[i], "socket=", 7) == 0) {
            socket_path = g_strdup(value + 1);
        } else if (value && strncmp(argv[i], "list_registers=", 15) == 0) {
            if (!qemu_plugin_bool_parse("list_registers", value + 1, &list_registers)) {
                fprintf(stderr, "klprecord: list_registers=on|off, not %s\n", value + 1);
                return -1;
            }
        } else {
            fprintf(stderr, "klprecord: unknown argument %s (socket=PATH[,list_registers=on])\n", argv[i]);
            return -1;
        }
    }
    if (!socket_path) {
        fprintf(stderr, "klprecord: socket=PATH is required\n");
        return -1;
    }
    listen_fd = listen_on(socket_path);
    if (listen_fd < 0) {
        return -1;
    }
    register_callbacks(id);

    /* the control thread takes no signal: QEMU's threads handle them */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int err = pthread_create(&thread, &attr, control_thread, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        fprintf(stderr, "klprecord: cannot start its thread: %s\n", strerror(err));
        return -1;
    }
    return 0;
}
