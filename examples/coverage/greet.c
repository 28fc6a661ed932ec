/* A program with one branch per role, to show coverage combined across
 * machines: machine "a" runs `greet server`, machine "b" runs `greet client`. */
#include <stdio.h>
#include <string.h>

static int serve(void) {
  puts("serving");
  return 0;
}

static int connect_to_server(void) {
  puts("connecting");
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fputs("usage: greet server|client\n", stderr);
    return 2;
  }
  if (strcmp(argv[1], "server") == 0)
    return serve();
  if (strcmp(argv[1], "client") == 0)
    return connect_to_server();
  fprintf(stderr, "greet: unknown role %s\n", argv[1]);
  return 2;
}
