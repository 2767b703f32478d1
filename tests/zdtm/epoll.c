/*
 * epoll: an epoll (fd 20) watching an empty pipe (read end 21, level-triggered, cookie
 * 0x1111222233334444), an eventfd (23, EPOLLIN|EPOLLET, cookie 0xabcdef) and a second pipe
 * (read end 24) that already holds 3 bytes (cookie 0x55). After SIGUSR2: only the full pipe
 * is ready; writing the others makes all three report their own cookies; EPOLL_CTL_DEL and
 * EPOLL_CTL_MOD by the task's own numbers work (the kernel keys watches on file + number).
 */
#include "zdtm.h"
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#define EP 20
#define A_RD 21
#define A_WR 22
#define EFD 23
#define B_RD 24
#define B_WR 25

static void place(int fd, int want)
{
	if (fd != want && (dup2(fd, want) != want || close(fd)))
		zdtm_die("dup2");
}

static void watch(int fd, uint32_t events, uint64_t data)
{
	struct epoll_event ev = { .events = events, .data.u64 = data };
	if (epoll_ctl(EP, EPOLL_CTL_ADD, fd, &ev))
		zdtm_die("epoll_ctl");
}

/* The cookies epoll_wait reports right now, as a bit set: 1 pipe A, 2 eventfd, 4 pipe B. */
static int ready(void)
{
	struct epoll_event evs[8];
	int n = epoll_wait(EP, evs, 8, 0), got = 0;
	if (n < 0)
		zdtm_fail("epoll_wait: %s", strerror(errno));
	for (int i = 0; i < n; i++) {
		uint64_t d = evs[i].data.u64;
		if (d == 0x1111222233334444ULL && evs[i].events & EPOLLIN)
			got |= 1;
		else if (d == 0xabcdef && evs[i].events & EPOLLIN)
			got |= 2;
		else if (d == 0x55 && evs[i].events & EPOLLIN)
			got |= 4;
		else
			zdtm_fail("unexpected event 0x%x cookie 0x%llx", evs[i].events,
				  (unsigned long long)d);
	}
	return got;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	int a[2], b[2];
	if (pipe(a) || pipe(b))
		zdtm_die("pipe");
	int ep = epoll_create1(0), efd = eventfd(0, EFD_NONBLOCK);
	if (ep < 0 || efd < 0)
		zdtm_die("epoll_create1/eventfd");
	place(ep, EP);
	place(a[0], A_RD);
	place(a[1], A_WR);
	place(efd, EFD);
	place(b[0], B_RD);
	place(b[1], B_WR);
	watch(A_RD, EPOLLIN, 0x1111222233334444ULL);
	watch(EFD, EPOLLIN | EPOLLET, 0xabcdef);
	watch(B_RD, EPOLLIN, 0x55);
	if (write(B_WR, "abc", 3) != 3)
		zdtm_die("write");
	zdtm_ready();
	zdtm_wait();

	int got = ready();
	if (got != 4)
		zdtm_fail("ready after the move: 0x%x, want only the full pipe (0x4)", got);
	uint64_t one = 1;
	if (write(A_WR, "x", 1) != 1 || write(EFD, &one, 8) != 8)
		zdtm_fail("write: %s", strerror(errno));
	got = ready();
	if (got != 7)
		zdtm_fail("ready after writes: 0x%x, want 0x7", got);
	got = ready();           /* edge-triggered eventfd reports once */
	if (got != 5)
		zdtm_fail("ready again: 0x%x, want 0x5 (eventfd is edge-triggered)", got);
	if (epoll_ctl(EP, EPOLL_CTL_DEL, A_RD, NULL))
		zdtm_fail("EPOLL_CTL_DEL of fd %d: %s", A_RD, strerror(errno));
	struct epoll_event ev = { .events = EPOLLOUT, .data.u64 = 0x77 };
	if (epoll_ctl(EP, EPOLL_CTL_MOD, B_RD, &ev))
		zdtm_fail("EPOLL_CTL_MOD of fd %d: %s", B_RD, strerror(errno));
	if ((got = ready()) != 0)
		zdtm_fail("ready after DEL/MOD: 0x%x, want none", got);
	zdtm_pass();
}
