/*
 * The sandbox ("pause") process of every pod on the local cluster's real node (tests/controlplane.py).
 *
 * It holds the pod's namespaces open and does nothing else: it waits for signals synchronously,
 * reaps any child that ends up with it as pid 1 (SIGCHLD), and exits 0 on SIGINT or SIGTERM.
 * Blocking the signals and taking them with sigwait() also works as pid 1 of a pid namespace,
 * where the kernel would drop signals whose disposition is the default.
 * Built static (gcc -static) into a FROM-scratch image: there is no registry to pull one from.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>

int main(void)
{
	sigset_t wanted;
	int sig;

	sigemptyset(&wanted);
	sigaddset(&wanted, SIGINT);
	sigaddset(&wanted, SIGTERM);
	sigaddset(&wanted, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &wanted, NULL) != 0)
		return 1;
	for (;;) {
		if (sigwait(&wanted, &sig) != 0)
			continue;
		if (sig != SIGCHLD)
			return 0;
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
	}
}
