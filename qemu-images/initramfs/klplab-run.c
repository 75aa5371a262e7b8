// SPDX-License-Identifier: GPL-2.0
/*
 * klplab-run: the lab's workload driver, a static ppc64le program.
 *
 * Forks TASKS processes; each writes "KIND BATCH FLAGS" to /proc/klp_lab/run
 * until it has made CALLS calls of every chosen kind, so the calls run in the
 * kernel on that task. Optionally a further process cycles the live patch
 * (disable, wait for the transition, unload, load again) while they run.
 * At the end it prints the guest's own per-kind counts.
 *
 * usage: klplab-run [-t TASKS] [-k KIND,...|all] [-n CALLS] [-b BATCH]
 *                   [-w WORK] [-f FLAG,...] [-p CYCLES] [-P PATCH.ko] [-m] [-r]
 *   -m: each task moves to the next online CPU before each batch (the
 *       scheduler alone may leave every task on one CPU for a whole run)
 *   -w: after each batch, WORK rounds of system calls that call no patched
 *       function (a stat of "/" and a getppid), so that redirections are a
 *       fixed share of a kernel's work, as on a real system
 *   flags: yield, sleep, hold, nap, fault-magic, fault-toc, fault-ra, fault-r1,
 *          fault-toc-slot, fault-unbalanced (or a number);  -r: reset counters first
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RUN_FILE "/proc/klp_lab/run"
#define COUNTS_FILE "/proc/klp_lab/counts"
#define PATCH_DIR "/sys/kernel/livepatch/klp_lab_patch"

static const char *const all_kinds[] = {
	"local", "local_other", "global", "indirect", "many_args", "varargs", "sibling",
};
#define NR_KINDS (sizeof(all_kinds) / sizeof(all_kinds[0]))

struct options {
	int tasks;
	long calls;
	long batch;
	long work;
	unsigned long flags;
	int patch_cycles;
	const char *patch_ko;
	int reset;
	int migrate;
	const char *kinds[NR_KINDS];
	int nr_kinds;
};

static void die(const char *what)
{
	fprintf(stderr, "klplab-run: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void usage(void)
{
	fprintf(stderr, "usage: klplab-run [-t TASKS] [-k KIND,...|all] [-n CALLS] [-b BATCH]\n"
			"                  [-w WORK] [-f FLAG,...] [-p CYCLES] [-P PATCH.ko] [-m] [-r]\n");
	exit(2);
}

static void parse_kinds(struct options *o, char *list)
{
	char *name;
	unsigned int i;

	o->nr_kinds = 0;
	for (name = strtok(list, ","); name; name = strtok(NULL, ",")) {
		if (!strcmp(name, "all")) {
			for (i = 0; i < NR_KINDS; i++)
				o->kinds[i] = all_kinds[i];
			o->nr_kinds = NR_KINDS;
			return;
		}
		for (i = 0; i < NR_KINDS && strcmp(name, all_kinds[i]); i++)
			;
		if (i == NR_KINDS || o->nr_kinds == (int)NR_KINDS) {
			fprintf(stderr, "klplab-run: unknown call kind '%s'\n", name);
			exit(2);
		}
		o->kinds[o->nr_kinds++] = all_kinds[i];
	}
}

static const struct {
	const char *name;
	unsigned long value;
} flag_names[] = {
	{ "yield", 0x1 }, { "sleep", 0x2 }, { "hold", 0x4 }, { "nap", 0x8 },
	{ "fault-magic", 0x10 }, { "fault-toc", 0x20 }, { "fault-ra", 0x40 },
	{ "fault-r1", 0x80 }, { "fault-toc-slot", 0x100 }, { "fault-unbalanced", 0x200 },
};

static unsigned long parse_flags(char *list)
{
	unsigned long flags = 0;
	char *name, *end;
	unsigned int i;

	for (name = strtok(list, ","); name; name = strtok(NULL, ",")) {
		for (i = 0; i < sizeof(flag_names) / sizeof(flag_names[0]); i++)
			if (!strcmp(name, flag_names[i].name))
				break;
		if (i < sizeof(flag_names) / sizeof(flag_names[0])) {
			flags |= flag_names[i].value;
			continue;
		}
		flags |= strtoul(name, &end, 0);
		if (*end) {
			fprintf(stderr, "klplab-run: unknown flag '%s'\n", name);
			exit(2);
		}
	}
	return flags;
}

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);

	if (fd < 0)
		die(path);
	if (write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		die(path);
	close(fd);
}

/* Kernel work without a patched function on its path. */
static void unpatched_work(long rounds)
{
	struct stat st;
	long i;

	for (i = 0; i < rounds; i++) {
		if (stat("/", &st))
			die("stat /");
		syscall(SYS_getppid);
	}
}

/* Pin the calling task to online CPU number (index modulo their count). */
static void move_to_cpu(long index)
{
	long online = sysconf(_SC_NPROCESSORS_ONLN);
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(online > 0 ? index % online : 0, &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		die("sched_setaffinity");
}

/* One task: CALLS calls of each kind, interleaved batch by batch. */
static int run_task(const struct options *o, int task)
{
	long done = 0;
	char cmd[64];
	int fd, k;

	fd = open(RUN_FILE, O_WRONLY);
	if (fd < 0)
		die(RUN_FILE);
	while (done < o->calls) {
		long n = o->calls - done < o->batch ? o->calls - done : o->batch;

		if (o->migrate)
			move_to_cpu(task + done / o->batch);

		for (k = 0; k < o->nr_kinds; k++) {
			int len = snprintf(cmd, sizeof(cmd), "%s %ld %#lx", o->kinds[k], n, o->flags);

			if (write(fd, cmd, len) != len)
				die(o->kinds[k]);
		}
		unpatched_work(o->work);
		done += n;
	}
	close(fd);
	return 0;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static int exists(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0;
}

/* Disable the patch, wait until it is gone, unload it and load it again. */
static void cycle_patch(const char *ko)
{
	int fd;

	write_file(PATCH_DIR "/enabled", "0");
	while (exists(PATCH_DIR))
		sleep_ms(10);
	while (syscall(SYS_delete_module, "klp_lab_patch", O_NONBLOCK) && errno == EAGAIN)
		sleep_ms(10);
	fd = open(ko, O_RDONLY);
	if (fd < 0)
		die(ko);
	if (syscall(SYS_finit_module, fd, "", 0))
		die("load patch");
	close(fd);
	while (exists(PATCH_DIR "/transition") && !access(PATCH_DIR "/transition", R_OK)) {
		char state = '1';

		fd = open(PATCH_DIR "/transition", O_RDONLY);
		if (fd < 0 || read(fd, &state, 1) != 1)
			state = '0';
		if (fd >= 0)
			close(fd);
		if (state == '0')
			break;
		sleep_ms(10);
	}
}

static void print_counts(void)
{
	char buf[1024];
	ssize_t n;
	int fd = open(COUNTS_FILE, O_RDONLY);

	if (fd < 0)
		die(COUNTS_FILE);
	printf("klplab-counts-begin\n");
	fflush(stdout);
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		fwrite(buf, 1, n, stdout);
	printf("klplab-counts-end\n");
	close(fd);
}

int main(int argc, char **argv)
{
	struct options o = {
		.tasks = 2, .calls = 200, .batch = 50,
		.patch_ko = "/lib/modules/klp_lab_patch.ko",
	};
	pid_t cycler = 0;
	int opt, i, status, failed = 0;
	char all[] = "all";

	parse_kinds(&o, all);
	while ((opt = getopt(argc, argv, "t:k:n:b:w:f:p:P:mr")) != -1) {
		switch (opt) {
		case 't': o.tasks = atoi(optarg); break;
		case 'k': parse_kinds(&o, optarg); break;
		case 'n': o.calls = atol(optarg); break;
		case 'b': o.batch = atol(optarg); break;
		case 'w': o.work = atol(optarg); break;
		case 'f': o.flags = parse_flags(optarg); break;
		case 'p': o.patch_cycles = atoi(optarg); break;
		case 'P': o.patch_ko = optarg; break;
		case 'm': o.migrate = 1; break;
		case 'r': o.reset = 1; break;
		default: usage();
		}
	}
	if (o.tasks < 1 || o.calls < 0 || o.batch < 1 || o.work < 0 || optind != argc)
		usage();
	if (o.reset)
		write_file(COUNTS_FILE, "reset");

	for (i = 0; i < o.tasks; i++) {
		pid_t pid = fork();

		if (pid < 0)
			die("fork");
		if (pid == 0)
			_exit(run_task(&o, i));
	}
	if (o.patch_cycles) {
		cycler = fork();
		if (cycler < 0)
			die("fork");
		if (cycler == 0) {
			for (i = 0; i < o.patch_cycles; i++)
				cycle_patch(o.patch_ko);
			_exit(0);
		}
	}
	while (wait(&status) > 0)
		if (!WIFEXITED(status) || WEXITSTATUS(status))
			failed = 1;
	print_counts();
	printf("klplab-run: %s (tasks=%d calls=%ld kinds=%d flags=%#lx patch_cycles=%d)\n",
	       failed ? "FAILED" : "done", o.tasks, o.calls, o.nr_kinds, o.flags, o.patch_cycles);
	return failed;
}
