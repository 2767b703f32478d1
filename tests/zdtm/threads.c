// zdtm-flags: -pthread
/*
 * threads: the main thread and 3 workers. Each worker has its own TLS value and blocks its own
 * real-time signal (SIGRTMIN+3+i) besides SIGUSR2 (so the check signal reaches main). On the
 * check every worker verifies its TLS and mask and reports; main checks it still has 4 threads.
 */
#include "zdtm.h"
#include <dirent.h>
#include <pthread.h>

#define N 3

static __thread unsigned long tls_value;
static volatile int go, verdict[N];	/* 0 none yet, 1 ok, 2 bad TLS, 3 bad mask */
static pthread_barrier_t started;

static void *worker(void *arg)
{
	int i = (int)(long)arg;
	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	sigaddset(&m, SIGRTMIN + 3 + i);
	pthread_sigmask(SIG_BLOCK, &m, NULL);
	tls_value = 0xc0ffee00UL + i;
	pthread_barrier_wait(&started);
	struct timespec ts = { 0, 10 * 1000 * 1000 };
	while (!go)
		nanosleep(&ts, NULL);
	pthread_sigmask(SIG_BLOCK, NULL, &m);
	int mask_ok = sigismember(&m, SIGUSR2);
	for (int s = SIGRTMIN + 3; s < SIGRTMIN + 3 + N; s++)
		mask_ok &= sigismember(&m, s) == (s == SIGRTMIN + 3 + i);
	verdict[i] = tls_value != 0xc0ffee00UL + i ? 2 : mask_ok ? 1 : 3;
	return NULL;
}

static int count_threads(void)
{
	DIR *d = opendir("/proc/self/task");
	int n = 0;
	for (struct dirent *e; d && (e = readdir(d));)
		n += e->d_name[0] != '.';
	if (d)
		closedir(d);
	return n;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	pthread_t t[N];
	tls_value = 0xabcdef;
	pthread_barrier_init(&started, NULL, N + 1);
	for (long i = 0; i < N; i++)
		if (pthread_create(&t[i], NULL, worker, (void *)i))
			zdtm_die("pthread_create");
	pthread_barrier_wait(&started);
	zdtm_ready();
	zdtm_wait();

	int n = count_threads();
	if (n != N + 1)
		zdtm_fail("%d threads, want %d", n, N + 1);
	if (tls_value != 0xabcdef)
		zdtm_fail("main TLS value %#lx", tls_value);
	go = 1;
	for (int i = 0; i < N; i++)
		pthread_join(t[i], NULL);
	for (int i = 0; i < N; i++)
		if (verdict[i] != 1)
			zdtm_fail("worker %d: %s", i, verdict[i] == 2 ? "wrong TLS value" : "wrong signal mask");
	zdtm_pass();
}
