/* smtpload: an SMTP load client for the server benchmarks.
 *
 *   smtpload HOST PORT CONCURRENCY SECONDS DATABYTES [tls]
 *
 * CONCURRENCY threads, each running sessions back to back for SECONDS: connect, read
 * the banner, EHLO, MAIL, 5 RCPT (3 listed, 2 not), optionally DATA with DATABYTES of
 * body, QUIT; with "tls", EHLO, STARTTLS and the handshake first (then EHLO again).
 * Lockstep, as a real client: a command, then its reply.  Prints one line:
 *   sessions errors seconds p50_ms p99_ms client_cpu_s
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <openssl/ssl.h>

static struct sockaddr_in addr;
static SSL_CTX *tls_ctx;
static __thread SSL *tls;

static int rd(int fd, char *b, int n) { return tls ? SSL_read(tls, b, n) : read(fd, b, n); }
static int wr(int fd, const char *b, int n) { return tls ? SSL_write(tls, b, n) : write(fd, b, n); }
static double stop_at;
static int databytes;
static char *body;

struct worker { pthread_t t; long n, errors, cap; double *lat; };

static double now(void) {
  struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* read one whole reply (multi-line); returns its code or -1 */
static int reply(int fd, char *buf, int *have) {
  for (;;) {
    char *start = buf;
    for (;;) {
      char *nl = memchr(start, '\n', *have - (start - buf));
      if (!nl) break;
      if (nl - start >= 3 && start[3] != '-') {
        int code = atoi(start);
        int used = nl + 1 - buf;
        memmove(buf, nl + 1, *have - used);
        *have -= used;
        return code;
      }
      start = nl + 1;
    }
    if (*have >= 8000) return -1;
    int r = rd(fd, buf + *have, 8192 - *have);
    if (r <= 0) return -1;
    *have += r;
  }
}

static int say(int fd, const char *s, int len) {
  while (len > 0) {
    int w = wr(fd, s, len);
    if (w <= 0) return -1;
    s += w; len -= w;
  }
  return 0;
}

static int session(void) {
  char buf[8192]; int have = 0, code;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { close(fd); return -1; }
  static const char *cmds[] = {
    "EHLO load.example\r\n", "MAIL FROM:<load@example.org>\r\n",
    "RCPT TO:<joe@example.com>\r\n", "RCPT TO:<nobody1@example.com>\r\n",
    "RCPT TO:<x@example.net>\r\n", "RCPT TO:<nobody2@example.com>\r\n",
    "RCPT TO:<joe-list-a@example.com>\r\n"};
  if (reply(fd, buf, &have) != 220) goto bad;
  if (tls_ctx) {
    if (say(fd, cmds[0], strlen(cmds[0])) < 0 || reply(fd, buf, &have) != 250) goto bad;
    if (say(fd, "STARTTLS\r\n", 10) < 0 || reply(fd, buf, &have) != 220) goto bad;
    tls = SSL_new(tls_ctx);
    SSL_set_fd(tls, fd);
    if (SSL_connect(tls) != 1) goto bad;
    have = 0;
  }
  for (int i = 0; i < 7; i++) {
    if (say(fd, cmds[i], strlen(cmds[i])) < 0) goto bad;
    code = reply(fd, buf, &have);
    if (code < 200 || code >= 600) goto bad;
  }
  if (databytes > 0) {
    if (say(fd, "DATA\r\n", 6) < 0 || reply(fd, buf, &have) != 354) goto bad;
    if (say(fd, body, strlen(body)) < 0) goto bad;
    if (reply(fd, buf, &have) != 250) goto bad;
  }
  if (say(fd, "QUIT\r\n", 6) < 0 || reply(fd, buf, &have) != 221) goto bad;
  if (tls) { SSL_free(tls); tls = 0; }
  close(fd);
  return 0;
bad:
  if (tls) { SSL_free(tls); tls = 0; }
  close(fd);
  return -1;
}

static void *run(void *arg) {
  struct worker *w = arg;
  while (now() < stop_at) {
    double t0 = now();
    if (session() < 0) { w->errors++; continue; }
    if (w->n == w->cap) {
      w->cap = w->cap ? w->cap * 2 : 4096;
      w->lat = realloc(w->lat, w->cap * sizeof(double));
    }
    w->lat[w->n++] = now() - t0;
  }
  return 0;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc != 6 && argc != 7) { fprintf(stderr, "usage: smtpload HOST PORT CONCURRENCY SECONDS DATABYTES [tls]\n"); return 2; }
  if (argc == 7) {
    tls_ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, 0);
  }
  addr.sin_family = AF_INET;
  addr.sin_port = htons(atoi(argv[2]));
  inet_pton(AF_INET, argv[1], &addr.sin_addr);
  int conc = atoi(argv[3]);
  double secs = atof(argv[4]);
  databytes = atoi(argv[5]);
  if (databytes > 0) {
    body = malloc(databytes + 64);
    strcpy(body, "Subject: load\r\n\r\n");
    int n = strlen(body);
    while (n < databytes) {
      int line = databytes - n < 78 ? databytes - n : 78;
      memset(body + n, 'x', line);
      n += line;
      memcpy(body + n, "\r\n", 2); n += 2;
    }
    strcpy(body + n, ".\r\n");
  }
  struct worker *ws = calloc(conc, sizeof *ws);
  double t0 = now();
  stop_at = t0 + secs;
  for (int i = 0; i < conc; i++) pthread_create(&ws[i].t, 0, run, &ws[i]);
  long total = 0, errors = 0;
  for (int i = 0; i < conc; i++) { pthread_join(ws[i].t, 0); total += ws[i].n; errors += ws[i].errors; }
  double elapsed = now() - t0;
  double *all = malloc((total + 1) * sizeof(double));
  long k = 0;
  for (int i = 0; i < conc; i++) for (long j = 0; j < ws[i].n; j++) all[k++] = ws[i].lat[j];
  qsort(all, total, sizeof(double), cmp);
  struct rusage ru; getrusage(RUSAGE_SELF, &ru);
  double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
  printf("%ld %ld %.3f %.3f %.3f %.3f\n", total, errors, elapsed,
         total ? all[total / 2] * 1000 : 0, total ? all[(long)(total * 0.99)] * 1000 : 0, cpu);
  return 0;
}
