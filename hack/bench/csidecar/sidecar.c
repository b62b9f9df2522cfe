/*
 * meshlane test sidecar (L4, C, epoll): an Envoy-like L4 proxy for
 * `make bench`, where no real mesh proxy is installable. It does the job of
 * the Go test sidecar (`podbin sidecar --copy buffer`, test/podbin/sidecar.go)
 * without a runtime, goroutines or a scheduler of its own, so that the
 * benchmark's CPU goes to the redirect it compares, not to the proxy.
 *
 *   listeners  outbound 0.0.0.0:15001 and [::]:15001, inbound 0.0.0.0:15006
 *              and [::]:15006 (Istio's ports), SO_REUSEADDR as Go's
 *              listeners, the IPv6 ones IPV6_V6ONLY as Envoy binds them.
 *   accept     asks the kernel where the connection was headed:
 *              SO_ORIGINAL_DST (SOL_IP) on IPv4 sockets,
 *              IP6T_SO_ORIGINAL_DST (SOL_IPV6) on IPv6 ones; conntrack
 *              answers under iptables, meshlane's getsockopt program under
 *              meshlane. No answer, or an answer that is the listener's own
 *              port on the accepted address (nothing redirected it): the
 *              connection is closed and counted.
 *   upstream   a non-blocking connect to that destination; inbound from
 *              127.0.0.6 or ::6, Istio's inbound passthrough source, which
 *              the redirect leaves alone.
 *   relay      read(2)/write(2) through one 64 KiB buffer per direction,
 *              TCP_NODELAY on both sockets (as Envoy). Never splice(2): on
 *              sockets fed by sk_msg it answers EAGAIN with data queued
 *              (README, "The socket short-circuit"). A full peer stops
 *              reading from the other side until it drains; EOF is passed
 *              on as shutdown(SHUT_WR); an error or a reset on either socket
 *              closes both.
 *
 * One thread and edge-triggered epoll, as Envoy's event loop: each socket
 * is registered once, for reading and writing, and never modified. A
 * level-triggered loop would need an epoll_ctl each time a direction stalls
 * on a full peer and each time it resumes, and would report every idle
 * writable socket on every wait. The cost of edges is that a socket must be
 * read until it is known to be empty; see pump().
 *
 * Usage: meshlane-csidecar [--ready FILE]. SIGTERM or SIGINT close every
 * socket, print the counters to stderr and exit 0.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* From linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h, whose
 * other definitions clash with glibc's netinet/in.h. Both are 80. */
#ifndef SO_ORIGINAL_DST
#define SO_ORIGINAL_DST 80
#endif
#define IP6T_SO_ORIGINAL_DST 80

enum {
	BUF_SIZE = 64 << 10,
	/* The bench opens at most 10,000 connections through a sidecar
	 * (--conns); each takes two sockets and up to 128 KiB of buffers, so
	 * the bound is also 2 GiB of memory. */
	MAX_CONNS = 16384,
	/* Descriptors besides the connections': listeners, epoll, signals,
	 * stdio, the ready file. */
	SPARE_FDS = 16,
	MAX_EVENTS = 256,
	/* Failures are logged up to this many lines, then only counted: a
	 * broken redirect under load must not fill the disk. */
	MAX_LOG_LINES = 100,
};

/* What an epoll event points at: the first member of each target. */
enum kind { KIND_LISTENER, KIND_SOCKET, KIND_SIGNALS };

struct listener {
	enum kind kind;
	int fd;
	bool inbound;
	union {
		struct sockaddr sa;
		struct sockaddr_in in;
		struct sockaddr_in6 in6;
	} addr;
};

struct conn;

/* One socket of a relayed connection. */
struct end {
	enum kind kind;
	int fd;
	/* readable: the last event said there may be bytes or an EOF to read,
	 * and no read has found the socket empty since. */
	bool readable;
	/* hup: the peer's FIN (or a hang-up) was reported, so the read that
	 * returns 0 must happen even after a short read (see pump). */
	bool hup;
	struct conn *conn;
};

/* Bytes going one way; buf[off, len) have been read and not yet written. */
struct dir {
	struct end *src, *dst;
	char *buf;
	size_t off, len;
	bool eof;  /* src returned EOF */
	bool shut; /* the EOF was passed on: dst is shut down for writing */
};

struct conn {
	struct end down, up; /* the accepted socket, the upstream one */
	struct dir to_up, to_down;
	struct sockaddr_storage dst; /* the original destination, for logs */
	bool connecting;     /* the upstream connect has not completed */
	bool dead;           /* closed; freed after the current batch of events */
	struct conn *prev, *next; /* in live, or in dying once dead */
};

/* Reported at exit; each closed connection is counted once. */
static struct {
	unsigned long accepted, relayed, refused_limit, origdst_failed,
		not_redirected, upstream_failed, aborted, open_at_exit;
} stats;

static int epfd = -1;
static int max_conns;
static int nconns;
static struct conn *live;  /* every open connection, to close them at exit */
static struct conn *dying; /* closed during this batch of events */
static int log_lines;

static void fail_log(const char *fmt, ...)
{
	va_list ap;

	if (log_lines >= MAX_LOG_LINES)
		return;
	if (++log_lines == MAX_LOG_LINES) {
		fprintf(stderr, "meshlane-csidecar: %d failures logged; further ones are only counted\n",
			MAX_LOG_LINES);
		return;
	}
	fputs("meshlane-csidecar: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void die(const char *what)
{
	fprintf(stderr, "meshlane-csidecar: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* addr_str formats ip:port, [ip6]:port, into buf (INET6_ADDRSTRLEN + 8). */
static const char *addr_str(const struct sockaddr *sa, char *buf, size_t size)
{
	char ip[INET6_ADDRSTRLEN];
	const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
	const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;

	if (sa->sa_family == AF_INET) {
		inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
		snprintf(buf, size, "%s:%u", ip, ntohs(in->sin_port));
	} else {
		inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
		snprintf(buf, size, "[%s]:%u", ip, ntohs(in6->sin6_port));
	}
	return buf;
}

/* unmap turns an IPv4-mapped IPv6 address into the IPv4 one, in place, as
 * the Go sidecar does before it compares or dials. */
static void unmap(struct sockaddr_storage *ss)
{
	struct sockaddr_in6 in6 = *(struct sockaddr_in6 *)ss;
	struct sockaddr_in *in = (struct sockaddr_in *)ss;

	if (ss->ss_family != AF_INET6 || !IN6_IS_ADDR_V4MAPPED(&in6.sin6_addr))
		return;
	memset(in, 0, sizeof(*in));
	in->sin_family = AF_INET;
	in->sin_port = in6.sin6_port;
	memcpy(&in->sin_addr, &in6.sin6_addr.s6_addr[12], 4);
}

static bool same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	const struct sockaddr_in *a4 = (const void *)a, *b4 = (const void *)b;
	const struct sockaddr_in6 *a6 = (const void *)a, *b6 = (const void *)b;

	if (a->ss_family != b->ss_family)
		return false;
	if (a->ss_family == AF_INET)
		return a4->sin_port == b4->sin_port && a4->sin_addr.s_addr == b4->sin_addr.s_addr;
	return a6->sin6_port == b6->sin6_port &&
	       IN6_ARE_ADDR_EQUAL(&a6->sin6_addr, &b6->sin6_addr);
}

/* original_dst reads where fd was headed before the redirect, refusing what
 * would be a bug in whatever answered (an unspecified address or port 0),
 * like the Go sidecar's decodeSockaddr. */
static bool original_dst(int fd, int family, struct sockaddr_storage *dst)
{
	/* Exactly a sockaddr_in or sockaddr_in6: conntrack refuses less, and
	 * meshlane's program writes that much. */
	socklen_t len = family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
	const struct sockaddr_in *in = (const void *)dst;
	const struct sockaddr_in6 *in6 = (const void *)dst;
	char s[INET6_ADDRSTRLEN + 8];
	int err;

	memset(dst, 0, sizeof(*dst));
	if (family == AF_INET)
		err = getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, dst, &len);
	else
		err = getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, dst, &len);
	if (err) {
		fail_log("getsockopt(%s): %s", family == AF_INET ? "SOL_IP, SO_ORIGINAL_DST" :
			 "SOL_IPV6, IP6T_SO_ORIGINAL_DST", strerror(errno));
		return false;
	}
	if (dst->ss_family == AF_INET && len >= sizeof(*in) && in->sin_port &&
	    in->sin_addr.s_addr != htonl(INADDR_ANY))
		return true;
	if (dst->ss_family == AF_INET6 && len >= sizeof(*in6) && in6->sin6_port &&
	    !IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr)) {
		unmap(dst);
		return true;
	}
	fail_log("original destination %s (family %d, %u bytes) is not an address to dial",
		 dst->ss_family == AF_INET || dst->ss_family == AF_INET6 ?
			 addr_str((struct sockaddr *)dst, s, sizeof(s)) : "?",
		 dst->ss_family, (unsigned)len);
	return false;
}

/* Registers a socket for every event it will ever need, edge-triggered. */
static void watch(int fd, void *target)
{
	struct epoll_event ev = {
		.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
		.data.ptr = target,
	};

	if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev))
		die("epoll_ctl");
}

static void set_nodelay(int fd)
{
	int one = 1;

	/* Only fails on a socket that is already gone; the relay will see it. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* dial starts the upstream connection; the passthrough source applies to
 * inbound connections only. Returns the socket, or -1 (logged). */
static int dial(const struct sockaddr_storage *dst, bool inbound, bool *connecting)
{
	const struct sockaddr_in pt4 = {
		.sin_family = AF_INET,
		.sin_addr.s_addr = htonl(0x7f000006), /* 127.0.0.6 */
	};
	const struct sockaddr_in6 pt6 = {
		.sin6_family = AF_INET6,
		.sin6_addr.s6_addr[15] = 6, /* ::6 */
	};
	socklen_t len = dst->ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
	char s[INET6_ADDRSTRLEN + 8];
	int fd, one = 1;

	fd = socket(dst->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		fail_log("socket: %s", strerror(errno));
		return -1;
	}
	set_nodelay(fd);
	if (inbound) {
		const struct sockaddr *src = dst->ss_family == AF_INET ? (const void *)&pt4 : (const void *)&pt6;

		/* The source port is then picked at connect() by the whole
		 * 4-tuple, as for any outgoing connection, instead of being
		 * reserved for the passthrough address alone at bind(). */
		setsockopt(fd, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
		if (bind(fd, src, len)) {
			fail_log("bind %s: %s", addr_str(src, s, sizeof(s)), strerror(errno));
			close(fd);
			return -1;
		}
	}
	*connecting = false;
	if (connect(fd, (const struct sockaddr *)dst, len)) {
		if (errno != EINPROGRESS) {
			fail_log("connect %s: %s", addr_str((const struct sockaddr *)dst, s, sizeof(s)),
				 strerror(errno));
			close(fd);
			return -1;
		}
		*connecting = true;
	}
	return fd;
}

static void link_conn(struct conn **list, struct conn *c)
{
	c->prev = NULL;
	c->next = *list;
	if (*list)
		(*list)->prev = c;
	*list = c;
}

static void unlink_conn(struct conn **list, struct conn *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else
		*list = c->next;
	if (c->next)
		c->next->prev = c->prev;
}

static void free_conn(struct conn *c)
{
	free(c->to_up.buf);
	free(c->to_down.buf);
	free(c);
}

/* close_conn closes both sockets at once. The memory waits until the end
 * of the batch of events: a later event of the same batch may still point
 * at the connection, and finds it dead. */
static void close_conn(struct conn *c, unsigned long *counter)
{
	close(c->down.fd);
	close(c->up.fd);
	c->dead = true;
	(*counter)++;
	nconns--;
	unlink_conn(&live, c);
	link_conn(&dying, c);
}

static void start_conn(struct listener *l, int fd)
{
	struct sockaddr_storage dst, self;
	socklen_t len = sizeof(self);
	char s[INET6_ADDRSTRLEN + 8];
	struct conn *c;
	bool connecting;
	int up;

	stats.accepted++;
	if (!original_dst(fd, l->addr.sa.sa_family, &dst)) {
		stats.origdst_failed++;
		close(fd);
		return;
	}
	/* Conntrack answers with the socket's own address when nothing
	 * rewrote the destination: the listener's own port on the accepted
	 * address. Relaying would connect to ourselves. (A connection steered
	 * to the listener keeps the address and port it dialed, which are its
	 * original destination, as with TPROXY.) */
	if (getsockname(fd, (struct sockaddr *)&self, &len) == 0) {
		in_port_t port = l->addr.sa.sa_family == AF_INET ? l->addr.in.sin_port : l->addr.in6.sin6_port;

		unmap(&self);
		if (self.ss_family == AF_INET)
			((struct sockaddr_in *)&self)->sin_port = port;
		else
			((struct sockaddr_in6 *)&self)->sin6_port = port;
		if (same_addr(&dst, &self)) {
			fail_log("original destination %s is this listener itself: the connection was not redirected",
				 addr_str((struct sockaddr *)&dst, s, sizeof(s)));
			stats.not_redirected++;
			close(fd);
			return;
		}
	}
	up = dial(&dst, l->inbound, &connecting);
	if (up < 0) {
		stats.upstream_failed++;
		close(fd);
		return;
	}
	set_nodelay(fd);
	c = calloc(1, sizeof(*c));
	if (c) {
		c->to_up.buf = malloc(BUF_SIZE);
		c->to_down.buf = malloc(BUF_SIZE);
	}
	if (!c || !c->to_up.buf || !c->to_down.buf) {
		fail_log("out of memory for a connection");
		if (c)
			free_conn(c);
		stats.aborted++;
		close(fd);
		close(up);
		return;
	}
	c->down = (struct end){ .kind = KIND_SOCKET, .fd = fd, .conn = c };
	c->up = (struct end){ .kind = KIND_SOCKET, .fd = up, .conn = c };
	c->to_up.src = &c->down;
	c->to_up.dst = &c->up;
	c->to_down.src = &c->up;
	c->to_down.dst = &c->down;
	c->dst = dst;
	c->connecting = connecting;
	nconns++;
	link_conn(&live, c);
	/* Adding a socket that is already readable (or connected) reports it
	 * at once, so nothing that happened before this is missed. */
	watch(fd, &c->down);
	watch(up, &c->up);
}

static void accept_all(struct listener *l)
{
	char s[INET6_ADDRSTRLEN + 8];

	/* Edge-triggered: accept until the queue is empty. */
	for (;;) {
		int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno != EAGAIN)
				/* ENFILE, ENOBUFS, ENOMEM: the queue is retried
				 * when the next connection arrives. */
				fail_log("accept on %s: %s", addr_str(&l->addr.sa, s, sizeof(s)),
					 strerror(errno));
			return;
		}
		if (nconns >= max_conns) {
			fail_log("connection limit reached (%d open): closing a new one on %s",
				 nconns, addr_str(&l->addr.sa, s, sizeof(s)));
			stats.refused_limit++;
			close(fd);
			continue;
		}
		start_conn(l, fd);
	}
}

/*
 * pump moves bytes from d->src to d->dst until one of them would block, and
 * passes an EOF on once everything before it is written. It returns false
 * on an error on either socket.
 *
 * With edge-triggered events a socket is read again only while it may hold
 * something: after a read that got EAGAIN, or that returned less than it
 * asked for, the socket was empty, and the next bytes or the FIN raise a
 * new edge (the kernel wakes epoll on every arrival, plain or sk_msg-fed).
 * That saves the read that would only say EAGAIN after every message. The
 * exception is a FIN already reported: no new edge will come for it, so
 * reads go on until one returns 0. A write that stops short is retried at
 * once: its EAGAIN is what guarantees an EPOLLOUT edge when room returns.
 */
static bool pump(struct conn *c, struct dir *d)
{
	for (;;) {
		ssize_t n;

		if (d->off < d->len) {
			if (c->connecting)
				return true;
			n = write(d->dst->fd, d->buf + d->off, d->len - d->off);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				return errno == EAGAIN;
			}
			d->off += n;
			continue;
		}
		d->off = d->len = 0;
		if (d->eof) {
			if (!d->shut && !c->connecting) {
				if (shutdown(d->dst->fd, SHUT_WR))
					return false;
				d->shut = true;
			}
			return true;
		}
		if (!d->src->readable)
			return true;
		n = read(d->src->fd, d->buf, BUF_SIZE);
		if (n > 0) {
			d->len = n;
			if (n < BUF_SIZE && !d->src->hup)
				d->src->readable = false;
		} else if (n == 0) {
			d->eof = true;
		} else if (errno == EAGAIN) {
			d->src->readable = false;
			return true;
		} else if (errno != EINTR) {
			return false;
		}
	}
}

static void on_socket(struct end *e, uint32_t events)
{
	struct conn *c = e->conn;
	char s[INET6_ADDRSTRLEN + 8];

	if (c->dead)
		return;
	if (events & EPOLLERR) {
		int err = 0;
		socklen_t len = sizeof(err);

		if (e == &c->up && c->connecting) {
			/* The connect failed; say why and to where. */
			getsockopt(e->fd, SOL_SOCKET, SO_ERROR, &err, &len);
			fail_log("connect %s: %s", addr_str((struct sockaddr *)&c->dst, s, sizeof(s)),
				 strerror(err));
			close_conn(c, &stats.upstream_failed);
		} else {
			/* A reset, or another error: whatever either side
			 * still had in flight is lost, as with a plain TCP
			 * connection that breaks. */
			close_conn(c, &stats.aborted);
		}
		return;
	}
	if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP))
		e->readable = true;
	if (events & (EPOLLRDHUP | EPOLLHUP))
		e->hup = true;
	/* The first EPOLLOUT of the upstream socket without an error is the
	 * completed connect; no SO_ERROR call is needed to learn that. */
	if (e == &c->up && (events & EPOLLOUT))
		c->connecting = false;
	if (!pump(c, &c->to_up) || !pump(c, &c->to_down)) {
		close_conn(c, &stats.aborted);
		return;
	}
	if (c->to_up.shut && c->to_down.shut)
		close_conn(c, &stats.relayed);
}

static void open_listener(struct listener *l, int family, const char *ip, int port, bool inbound)
{
	char s[INET6_ADDRSTRLEN + 8];
	int one = 1;
	socklen_t len;

	memset(l, 0, sizeof(*l));
	l->kind = KIND_LISTENER;
	l->inbound = inbound;
	if (family == AF_INET) {
		l->addr.in.sin_family = AF_INET;
		l->addr.in.sin_port = htons(port);
		inet_pton(AF_INET, ip, &l->addr.in.sin_addr);
		len = sizeof(l->addr.in);
	} else {
		l->addr.in6.sin6_family = AF_INET6;
		l->addr.in6.sin6_port = htons(port);
		inet_pton(AF_INET6, ip, &l->addr.in6.sin6_addr);
		len = sizeof(l->addr.in6);
	}
	addr_str(&l->addr.sa, s, sizeof(s));
	l->fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (l->fd < 0)
		die("socket");
	if (setsockopt(l->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)))
		die("setsockopt(SO_REUSEADDR)");
	/* 0.0.0.0:P and [::]:P side by side, two sockets, as Envoy binds. */
	if (family == AF_INET6 && setsockopt(l->fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)))
		die("setsockopt(IPV6_V6ONLY)");
	if (bind(l->fd, &l->addr.sa, len)) {
		fprintf(stderr, "meshlane-csidecar: listen %s: bind: %s\n", s, strerror(errno));
		exit(1);
	}
	/* The kernel caps the backlog at net.core.somaxconn, as Go's is. */
	if (listen(l->fd, SOMAXCONN))
		die("listen");
	watch(l->fd, l);
}

/* write_ready writes the listeners' addresses, one a line, as the Go
 * sidecar's --ready does: to a temporary file renamed into place, so a
 * waiter never reads half of it. */
static void write_ready(const char *path, const struct listener *ls, int n)
{
	char tmp[4096], s[INET6_ADDRSTRLEN + 8];
	const char *slash = strrchr(path, '/');
	int dirlen = slash ? (int)(slash - path) : 1;
	FILE *f;
	int fd;

	if (snprintf(tmp, sizeof(tmp), "%.*s/.ready-XXXXXX", dirlen, slash ? path : ".") >= (int)sizeof(tmp)) {
		fprintf(stderr, "meshlane-csidecar: --ready %s: path too long\n", path);
		exit(1);
	}
	fd = mkstemp(tmp);
	if (fd < 0)
		die("ready file");
	f = fdopen(fd, "w");
	if (!f)
		die("ready file");
	for (int i = 0; i < n; i++)
		fprintf(f, "%s\n", addr_str(&ls[i].addr.sa, s, sizeof(s)));
	if (fchmod(fd, 0644) || fclose(f) || rename(tmp, path)) {
		int err = errno;

		unlink(tmp);
		errno = err;
		die("ready file");
	}
}

/* Raises the descriptor limit to what MAX_CONNS needs, as far as the hard
 * limit allows, and sets max_conns to what fits. */
static void size_limits(void)
{
	struct rlimit rl;
	rlim_t want = 2 * (rlim_t)MAX_CONNS + SPARE_FDS;

	if (getrlimit(RLIMIT_NOFILE, &rl))
		die("getrlimit(RLIMIT_NOFILE)");
	if (rl.rlim_cur < want) {
		rl.rlim_cur = rl.rlim_max < want ? rl.rlim_max : want;
		if (setrlimit(RLIMIT_NOFILE, &rl))
			die("setrlimit(RLIMIT_NOFILE)");
	}
	max_conns = rl.rlim_cur >= want ? MAX_CONNS : (int)((rl.rlim_cur - SPARE_FDS) / 2);
	if (max_conns < 1) {
		fprintf(stderr, "meshlane-csidecar: RLIMIT_NOFILE %llu leaves no room for a connection\n",
			(unsigned long long)rl.rlim_cur);
		exit(1);
	}
}

static void usage(FILE *f)
{
	fputs("usage: meshlane-csidecar [--ready FILE]\n\n"
	      "An L4 stand-in for a mesh sidecar (Istio's ports): relays each connection\n"
	      "accepted on 15001 (outbound) or 15006 (inbound, from 127.0.0.6 / ::6) to\n"
	      "its original destination (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST).\n\n"
	      "  --ready FILE  write the listening addresses to FILE once listening\n",
	      f);
}

int main(int argc, char **argv)
{
	struct epoll_event events[MAX_EVENTS];
	struct listener ls[4];
	enum kind signals = KIND_SIGNALS;
	const char *ready = NULL;
	sigset_t mask;
	int sfd;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--ready") && i + 1 < argc) {
			ready = argv[++i];
		} else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			usage(stdout);
			return 0;
		} else {
			fprintf(stderr, "meshlane-csidecar: unexpected argument %s\n", argv[i]);
			usage(stderr);
			return 2;
		}
	}

	/* A write to a reset peer fails with EPIPE instead of killing us. */
	signal(SIGPIPE, SIG_IGN);
	/* SIGTERM and SIGINT arrive as events of the loop. */
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	if (sigprocmask(SIG_BLOCK, &mask, NULL))
		die("sigprocmask");
	sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sfd < 0)
		die("signalfd");
	size_limits();
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0)
		die("epoll_create1");
	watch(sfd, &signals);

	open_listener(&ls[0], AF_INET, "0.0.0.0", 15001, false);
	open_listener(&ls[1], AF_INET6, "::", 15001, false);
	open_listener(&ls[2], AF_INET, "0.0.0.0", 15006, true);
	open_listener(&ls[3], AF_INET6, "::", 15006, true);
	if (ready)
		write_ready(ready, ls, 4);
	fprintf(stderr, "meshlane-csidecar: listening (outbound 15001, inbound 15006), at most %d connections\n",
		max_conns);

	for (bool running = true; running;) {
		int n = epoll_wait(epfd, events, MAX_EVENTS, -1);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			enum kind *k = events[i].data.ptr;

			switch (*k) {
			case KIND_LISTENER:
				accept_all((struct listener *)k);
				break;
			case KIND_SOCKET:
				on_socket((struct end *)k, events[i].events);
				break;
			case KIND_SIGNALS:
				running = false;
				break;
			}
		}
		while (dying) {
			struct conn *c = dying;

			unlink_conn(&dying, c);
			free_conn(c);
		}
	}

	while (live) {
		struct conn *c = live;

		close_conn(c, &stats.open_at_exit);
		unlink_conn(&dying, c);
		free_conn(c);
	}
	for (int i = 0; i < 4; i++)
		close(ls[i].fd);
	close(sfd);
	close(epfd);
	fprintf(stderr,
		"meshlane-csidecar: exit: accepted %lu, relayed %lu, refused at the limit %lu, "
		"no original destination %lu, not redirected %lu, upstream failed %lu, aborted %lu, "
		"open at exit %lu\n",
		stats.accepted, stats.relayed, stats.refused_limit, stats.origdst_failed,
		stats.not_redirected, stats.upstream_failed, stats.aborted, stats.open_at_exit);
	return 0;
}
