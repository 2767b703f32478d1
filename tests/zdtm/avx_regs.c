/*
 * avx_regs: known values in all 16 ymm registers and a non-default MXCSR (round toward zero,
 * all exceptions masked) are kept in the registers, never spilled, while the process waits:
 * an asm loop sleeps with raw nanosleep system calls (which preserve vector state) until the
 * SIGUSR2 handler sets a flag, then stores the registers right away for comparison.
 * "ready" is written only once the registers are loaded: the asm sends itself SIGUSR1, whose
 * handler writes the ready file (signal delivery saves and restores the vector state).
 */
#include "zdtm.h"
#include <stdint.h>

#define MXCSR_WANT 0x7f80u	/* default 0x1f80 | round-toward-zero (bits 13-14) */

static const struct timespec nap = { 0, 20 * 1000 * 1000 };

/* Only async-signal-safe calls: write "ready\n" to a temporary name, then rename it. */
static void on_loaded(int sig)
{
	char tmp[4096];
	(void)sig;
	size_t n = strlen(zdtm_ready_path);
	if (n + 5 > sizeof(tmp))
		_exit(2);
	memcpy(tmp, zdtm_ready_path, n);
	memcpy(tmp + n, ".tmp", 5);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, "ready\n", 6) != 6 || close(fd) || rename(tmp, zdtm_ready_path))
		_exit(2);
}

int main(int argc, char **argv)
{
	zdtm_init(argc, argv);
	if (!__builtin_cpu_supports("avx"))
		zdtm_die("this CPU has no AVX");
	static uint8_t in[16 * 32] __attribute__((aligned(32))), out[16 * 32] __attribute__((aligned(32)));
	zdtm_fill(in, sizeof(in), 0, 13);
	uint32_t mxcsr_in = MXCSR_WANT, mxcsr_out = 0, mxcsr_saved;
	__asm__ volatile("stmxcsr %0" : "=m"(mxcsr_saved));
	struct sigaction sa = { .sa_handler = on_loaded };
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL))
		zdtm_die("sigaction SIGUSR1");

	__asm__ volatile(
		"ldmxcsr %[mxin]\n\t"
		"vmovdqa   0(%[in]), %%ymm0\n\t"  "vmovdqa  32(%[in]), %%ymm1\n\t"
		"vmovdqa  64(%[in]), %%ymm2\n\t"  "vmovdqa  96(%[in]), %%ymm3\n\t"
		"vmovdqa 128(%[in]), %%ymm4\n\t"  "vmovdqa 160(%[in]), %%ymm5\n\t"
		"vmovdqa 192(%[in]), %%ymm6\n\t"  "vmovdqa 224(%[in]), %%ymm7\n\t"
		"vmovdqa 256(%[in]), %%ymm8\n\t"  "vmovdqa 288(%[in]), %%ymm9\n\t"
		"vmovdqa 320(%[in]), %%ymm10\n\t" "vmovdqa 352(%[in]), %%ymm11\n\t"
		"vmovdqa 384(%[in]), %%ymm12\n\t" "vmovdqa 416(%[in]), %%ymm13\n\t"
		"vmovdqa 448(%[in]), %%ymm14\n\t" "vmovdqa 480(%[in]), %%ymm15\n\t"
		"mov $39, %%eax\n\t"		/* kill(getpid(), SIGUSR1): "ready" */
		"syscall\n\t"
		"mov %%eax, %%edi\n\t"
		"mov $10, %%esi\n\t"
		"mov $62, %%eax\n\t"
		"syscall\n\t"
		"1:\n\t"
		"mov $35, %%eax\n\t"		/* SYS_nanosleep(&nap, NULL) */
		"mov %[nap], %%rdi\n\t"
		"xor %%esi, %%esi\n\t"
		"syscall\n\t"
		"cmpl $0, %[flag]\n\t"
		"je 1b\n\t"
		"vmovdqa %%ymm0,    0(%[out])\n\t" "vmovdqa %%ymm1,   32(%[out])\n\t"
		"vmovdqa %%ymm2,   64(%[out])\n\t" "vmovdqa %%ymm3,   96(%[out])\n\t"
		"vmovdqa %%ymm4,  128(%[out])\n\t" "vmovdqa %%ymm5,  160(%[out])\n\t"
		"vmovdqa %%ymm6,  192(%[out])\n\t" "vmovdqa %%ymm7,  224(%[out])\n\t"
		"vmovdqa %%ymm8,  256(%[out])\n\t" "vmovdqa %%ymm9,  288(%[out])\n\t"
		"vmovdqa %%ymm10, 320(%[out])\n\t" "vmovdqa %%ymm11, 352(%[out])\n\t"
		"vmovdqa %%ymm12, 384(%[out])\n\t" "vmovdqa %%ymm13, 416(%[out])\n\t"
		"vmovdqa %%ymm14, 448(%[out])\n\t" "vmovdqa %%ymm15, 480(%[out])\n\t"
		"stmxcsr %[mxout]\n\t"
		"ldmxcsr %[mxsaved]\n\t"
		"vzeroupper\n\t"
		: [mxout] "=m"(mxcsr_out)
		: [in] "r"(in), [out] "r"(out), [nap] "r"(&nap), [flag] "m"(zdtm_check_now),
		  [mxin] "m"(mxcsr_in), [mxsaved] "m"(mxcsr_saved)
		: "rax", "rcx", "rdi", "rsi", "r11", "memory", "cc",
		  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
		  "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");

	if (mxcsr_out != MXCSR_WANT)
		zdtm_fail("MXCSR is %#x, want %#x", mxcsr_out, MXCSR_WANT);
	long bad = zdtm_mismatch(out, sizeof(out), 0, 13);
	if (bad >= 0)
		zdtm_fail("ymm%ld byte %ld is %#x, want %#x", bad / 32, bad % 32, out[bad], zdtm_byte(bad, 13));
	zdtm_pass();
}
