/*
 * pulsegen: meter pulses on a gpio-sim line, for the system test. TEST ONLY: built by
 * images/qemu/gpio-sim/build onto the gpio-sim test disk, never into an image.
 *
 *   pulsegen PULL_FILE COUNT PERIOD_US [BOUNCE_US...]
 *
 * PULL_FILE is /sys/devices/platform/<dev>/<chip>/sim_gpioN/pull. Pulse k rises ("pull-up")
 * at t0 + k * PERIOD_US and falls ("pull-down") half a period later: absolute deadlines on
 * CLOCK_MONOTONIC (clock_nanosleep TIMER_ABSTIME), so a long train does not drift. A pulse
 * that starts more than a quarter period late (the guest was descheduled: TCG on a busy host)
 * shifts the rest of the schedule by its lateness instead of catching up in a burst: a burst
 * of hundreds of edges within milliseconds is nothing a meter sends, and it overflowed the
 * kernel's event buffer (lost edges) while the train as a whole kept its pace. Each
 * BOUNCE_US adds contact bounce to every pulse: an extra rising edge BOUNCE_US after the pulse's
 * edge (the line drops 1 ms before it). Bounce edges are timed from the edge actually written
 * before them, never in a catch-up burst after an overrun, so they are at least as far apart as
 * asked (BOUNCE_US ascending, > 1000 us apart, < PERIOD_US / 2).
 * It runs SCHED_FIFO (below the kernel's IRQ threads), as the meter's hardware would not wait
 * for the guest's other tasks.
 * Prints "<rising edges written> rising edges, <n> late starts (max <us> us late), bounces up to
 * <us> us after their pulse" at the end: the last figure tells a test whether the bounce it asked
 * for was what the line saw (a bounce written later than the debounce is a pulse).
 */
#include <errno.h>
#include <sched.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int pull_fd;

static void now(struct timespec *t)
{
	clock_gettime(CLOCK_MONOTONIC, t);
}

/* Microseconds from `from` to `to`. */
static long long since_us(const struct timespec *from, const struct timespec *to)
{
	return (to->tv_sec - from->tv_sec) * 1000000LL + (to->tv_nsec - from->tv_nsec) / 1000;
}

static void at(const struct timespec *t0, long long us)
{
	struct timespec t = *t0;
	long long ns = t.tv_nsec + us * 1000LL;
	t.tv_sec += ns / 1000000000LL;
	t.tv_nsec = ns % 1000000000LL;
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR)
		;
}

static void set(const char *v)
{
	if (pwrite(pull_fd, v, strlen(v), 0) < 0) {
		perror("pulsegen: writing the pull");
		exit(1);
	}
}

static long long arg(const char *s, const char *what)
{
	char *end;
	long long v = strtoll(s, &end, 10);
	if (*s == '\0' || *end != '\0' || v < 0) {
		fprintf(stderr, "pulsegen: %s: not a number: %s\n", what, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: pulsegen PULL_FILE COUNT PERIOD_US [BOUNCE_US...]\n");
		return 2;
	}
	long long count = arg(argv[2], "COUNT"), period = arg(argv[3], "PERIOD_US");
	int nb = argc - 4;
	long long prev = 0;
	for (int i = 0; i < nb; i++) {
		long long b = arg(argv[4 + i], "BOUNCE_US");
		if (b <= prev + 1000 || b >= period / 2) {
			fprintf(stderr, "pulsegen: BOUNCE_US must ascend, > 1000 us apart, < PERIOD_US / 2\n");
			return 2;
		}
		prev = b;
	}
	pull_fd = open(argv[1], O_WRONLY);
	if (pull_fd < 0) {
		perror(argv[1]);
		return 1;
	}
	struct sched_param rt = { .sched_priority = 10 };
	if (sched_setscheduler(0, SCHED_FIFO, &rt) != 0 || mlockall(MCL_CURRENT | MCL_FUTURE) != 0)
		perror("pulsegen: real-time scheduling (going on without it)");
	set("pull-down");
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	t0.tv_sec += 1; /* start on a clean low level */
	long long edges = 0, shift = 0, late_starts = 0, max_late = 0, max_bounce = 0;
	for (long long k = 0; k < count; k++) {
		long long base = k * period + shift;
		at(&t0, base);
		struct timespec start;
		now(&start);
		long long late = since_us(&t0, &start) - base;
		if (late > max_late)
			max_late = late;
		if (late > period / 4) {
			late_starts++;
			shift += late;
			base += late;
		}
		set("pull-up");
		edges++;
		struct timespec edge, pulse;
		now(&edge);
		pulse = edge;
		long long prev_b = 0;
		for (int i = 0; i < nb; i++) {
			long long b = strtoll(argv[4 + i], NULL, 10);
			at(&edge, b - prev_b - 1000);
			set("pull-down");
			at(&edge, b - prev_b);
			set("pull-up");
			edges++;
			now(&edge);
			if (since_us(&pulse, &edge) > max_bounce)
				max_bounce = since_us(&pulse, &edge);
			prev_b = b;
		}
		at(&t0, base + period / 2);
		set("pull-down");
	}
	printf("%lld rising edges, %lld late starts (max %lld us late), bounces up to %lld us after "
	       "their pulse\n", edges, late_starts, max_late, max_bounce);
	return 0;
}
