/*
 * caps: credentials with a reduced capability state, as a daemon dropping root leaves them.
 *
 * Setup (as root): supplementary groups {1002}; SECBIT_KEEP_CAPS; CAP_SYS_MODULE, CAP_SYS_BOOT
 * and CAP_MKNOD dropped from the bounding set; with CAPS_UID defined (caps_uid.c) gids 1001
 * and uids CAPS_UID (real, effective, saved), else uid/gid 0 stay; then permitted {CHOWN, DAC_OVERRIDE, KILL, SETPCAP, NET_BIND_SERVICE}, effective
 * {DAC_OVERRIDE, KILL, SETPCAP}, inheritable {CHOWN, NET_BIND_SERVICE}; NET_BIND_SERVICE raised
 * ambient; securebits KEEP_CAPS|NOROOT; then SETPCAP dropped from the effective set;
 * no_new_privs. (DAC_OVERRIDE lets uid 1000 write the result in root's scratch directory.)
 *
 * Check: every one of those exactly as left: capget v3 words, each bounding bit up to
 * cap_last_cap, each ambient bit, securebits, uids/gids/fsuid/fsgid, groups, no_new_privs.
 */
#include "zdtm.h"
#include <grp.h>
#include <linux/capability.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#ifdef CAPS_UID
#define UID CAPS_UID
#define GID 1001
#else
#define UID 0
#define GID 0
#endif
#define GROUP 1002
#define SECBITS_WANT ((1 << 4) | (1 << 0))   /* SECBIT_KEEP_CAPS | SECBIT_NOROOT */
#define BIT(c) (1ULL << (c))

struct caps { unsigned long long eff, prm, inh; };

static int last_cap(void)
{
	FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "r");
	int n = -1;
	if (!f || fscanf(f, "%d", &n) != 1)
		zdtm_die("cap_last_cap");
	fclose(f);
	return n;
}

static struct caps get_caps(void)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2];
	if (syscall(SYS_capget, &h, d))
		zdtm_die("capget");
	struct caps c = {
		d[0].effective | (unsigned long long)d[1].effective << 32,
		d[0].permitted | (unsigned long long)d[1].permitted << 32,
		d[0].inheritable | (unsigned long long)d[1].inheritable << 32,
	};
	return c;
}

static void set_caps(struct caps c)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2] = {
		{ (unsigned)c.eff, (unsigned)c.prm, (unsigned)c.inh },
		{ (unsigned)(c.eff >> 32), (unsigned)(c.prm >> 32), (unsigned)(c.inh >> 32) },
	};
	if (syscall(SYS_capset, &h, d))
		zdtm_die("capset");
}

/* Bounding and ambient sets as bit masks, read one capability at a time. */
static unsigned long long bounding(int last)
{
	unsigned long long m = 0;
	for (int c = 0; c <= last; c++)
		if (prctl(PR_CAPBSET_READ, c, 0, 0, 0) == 1)
			m |= BIT(c);
	return m;
}

static unsigned long long ambient(int last)
{
	unsigned long long m = 0;
	for (int c = 0; c <= last; c++)
		if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, c, 0, 0) == 1)
			m |= BIT(c);
	return m;
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	int last = last_cap();
	gid_t groups[1] = { GROUP };
	if (setgroups(1, groups))
		zdtm_die("setgroups");
	if (prctl(PR_SET_SECUREBITS, 1 << 4, 0, 0, 0))     /* SECBIT_KEEP_CAPS */
		zdtm_die("PR_SET_SECUREBITS keep caps");
	int dropped[] = { CAP_SYS_MODULE, CAP_SYS_BOOT, CAP_MKNOD };
	for (unsigned i = 0; i < sizeof(dropped) / sizeof(dropped[0]); i++)
		if (prctl(PR_CAPBSET_DROP, dropped[i], 0, 0, 0))
			zdtm_die("PR_CAPBSET_DROP");
	if (setresgid(GID, GID, GID) || setresuid(UID, UID, UID))
		zdtm_die("setresuid");
	unsigned long long prm = BIT(CAP_CHOWN) | BIT(CAP_DAC_OVERRIDE) | BIT(CAP_KILL) |
				 BIT(CAP_SETPCAP) | BIT(CAP_NET_BIND_SERVICE);
	struct caps c = { BIT(CAP_DAC_OVERRIDE) | BIT(CAP_KILL) | BIT(CAP_SETPCAP), prm,
			  BIT(CAP_CHOWN) | BIT(CAP_NET_BIND_SERVICE) };
	set_caps(c);
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0))
		zdtm_die("PR_CAP_AMBIENT_RAISE");
	if (prctl(PR_SET_SECUREBITS, SECBITS_WANT, 0, 0, 0))
		zdtm_die("PR_SET_SECUREBITS");
	c.eff &= ~BIT(CAP_SETPCAP);          /* securebits can no longer be changed */
	set_caps(c);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		zdtm_die("PR_SET_NO_NEW_PRIVS");
	struct caps want = get_caps();
	unsigned long long want_bnd = bounding(last), want_amb = ambient(last);
	if (want_amb != BIT(CAP_NET_BIND_SERVICE) || want_bnd & BIT(CAP_MKNOD))
		zdtm_die("setup did not take");
	zdtm_ready();
	zdtm_wait();

	struct caps got = get_caps();
	if (got.eff != want.eff || got.prm != want.prm || got.inh != want.inh)
		zdtm_fail("caps eff/prm/inh %#llx/%#llx/%#llx, want %#llx/%#llx/%#llx", got.eff,
			  got.prm, got.inh, want.eff, want.prm, want.inh);
	unsigned long long bnd = bounding(last), amb = ambient(last);
	if (bnd != want_bnd)
		zdtm_fail("bounding set %#llx, want %#llx", bnd, want_bnd);
	if (amb != want_amb)
		zdtm_fail("ambient set %#llx, want %#llx", amb, want_amb);
	int sb = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
	if (sb != SECBITS_WANT)
		zdtm_fail("securebits %#x, want %#x", sb, SECBITS_WANT);
	uid_t r, e, s;
	gid_t rg, eg, sg;
	if (getresuid(&r, &e, &s) || r != UID || e != UID || s != UID || setfsuid(-1) != UID)
		zdtm_fail("uids %d/%d/%d, want %d", r, e, s, UID);
	if (getresgid(&rg, &eg, &sg) || rg != GID || eg != GID || sg != GID || setfsgid(-1) != GID)
		zdtm_fail("gids %d/%d/%d, want %d", rg, eg, sg, GID);
	gid_t now[8];
	int n = getgroups(8, now);
	if (n != 1 || now[0] != GROUP)
		zdtm_fail("%d supplementary groups (first %d), want {%d}", n, n > 0 ? (int)now[0] : -1,
			  GROUP);
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		zdtm_fail("no_new_privs is not set");
	/* The effective set works, not just reads back: KILL reaches a root process. */
	if (kill(1, 0))
		zdtm_fail("kill(1, 0) with CAP_KILL: %s", strerror(errno));
	zdtm_pass();
}
