/*
 * sk_unix_pair: unix socket pairs with data queued in both directions.
 *   fds 10/11: a stream pair; 3000 bytes wait on 10, 1500 on 11.
 *   fds 12/13: a dgram pair; 3 messages of 1, 700 and 5000 bytes wait on 12, 1 of 9 on 13.
 *   fds 14/15: a seqpacket pair; fd 15 shut its writing side after sending 2 messages.
 * After the move every queue reads back exactly (bytes and message boundaries), and each
 * pair still carries new data both ways.
 */
#include "zdtm.h"
#include <sys/ioctl.h>
#include <sys/socket.h>

enum { S0 = 10, S1, D0, D1, Q0, Q1 };
static const size_t dgram_len[] = { 1, 700, 5000 };

static void pair(int type, int a, int b)
{
	int sv[2];
	if (socketpair(AF_UNIX, type, 0, sv) || dup2(sv[0], a) < 0 || dup2(sv[1], b) < 0)
		zdtm_die("socketpair");
	close(sv[0]);
	close(sv[1]);
}

static void send_pattern(int fd, size_t len, unsigned seed)
{
	unsigned char buf[8192];
	zdtm_fill(buf, len, 0, seed);
	if (send(fd, buf, len, 0) != (ssize_t)len)
		zdtm_die("send");
}

/* One message (or for a stream: exactly `len` bytes) must read back with pattern `seed`. */
static void expect(int fd, size_t len, unsigned seed, const char *what)
{
	unsigned char buf[8192];
	ssize_t got = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
	if (got != (ssize_t)len)
		zdtm_fail("%s: read %zd bytes, want %zu (%s)", what, got, len,
			  got < 0 ? strerror(errno) : "boundary or data lost");
	long bad = zdtm_mismatch(buf, len, 0, seed);
	if (bad >= 0)
		zdtm_fail("%s: byte %ld is %#x", what, bad, buf[bad]);
}

static void expect_empty(int fd, const char *what)
{
	char c;
	ssize_t got = recv(fd, &c, 1, MSG_DONTWAIT);
	if (got >= 0 || errno != EAGAIN)
		zdtm_fail("%s: more queued than sent (recv gave %zd)", what, got);
}

static void still_connected(int a, int b, const char *what)
{
	char c = 0;
	if (send(a, "p", 1, 0) != 1 || recv(b, &c, 1, 0) != 1 || c != 'p' ||
	    send(b, "q", 1, 0) != 1 || recv(a, &c, 1, 0) != 1 || c != 'q')
		zdtm_fail("%s: the two ends no longer talk to each other", what);
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	pair(SOCK_STREAM, S0, S1);
	pair(SOCK_DGRAM, D0, D1);
	pair(SOCK_SEQPACKET, Q0, Q1);
	send_pattern(S1, 3000, 1);
	send_pattern(S0, 1500, 2);
	for (int i = 0; i < 3; i++)
		send_pattern(D1, dgram_len[i], 10 + i);
	send_pattern(D0, 9, 20);
	send_pattern(Q1, 100, 30);
	send_pattern(Q1, 200, 31);
	if (shutdown(Q1, SHUT_WR))
		zdtm_die("shutdown");
	zdtm_ready();
	zdtm_wait();

	int n = -1;
	if (ioctl(S0, FIONREAD, &n) || n != 3000)
		zdtm_fail("stream end 10 holds %d bytes, want 3000", n);
	expect(S0, 3000, 1, "stream 10");
	expect(S1, 1500, 2, "stream 11");
	expect_empty(S0, "stream 10");
	for (int i = 0; i < 3; i++)
		expect(D0, dgram_len[i], 10 + i, "dgram 12");
	expect_empty(D0, "dgram 12");
	expect(D1, 9, 20, "dgram 13");
	expect(Q0, 100, 30, "seqpacket 14");
	expect(Q0, 200, 31, "seqpacket 14");
	char c;
	if (recv(Q0, &c, 1, MSG_DONTWAIT) != 0)
		zdtm_fail("seqpacket 14: no end of file after the queue (peer shut its writing side)");
	if (send(Q1, "x", 1, MSG_NOSIGNAL) != -1 || errno != EPIPE)
		zdtm_fail("seqpacket 15: writing side is open again");
	int type = 0;
	socklen_t len = sizeof(type);
	if (getsockopt(D0, SOL_SOCKET, SO_TYPE, &type, &len) || type != SOCK_DGRAM)
		zdtm_fail("fd 12 is not a dgram socket (type %d)", type);
	still_connected(S0, S1, "stream");
	still_connected(D0, D1, "dgram");
	zdtm_pass();
}
