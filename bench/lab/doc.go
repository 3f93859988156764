// Package lab runs real PostgreSQL clusters for walship's tests and benchmarks.
//
// A Cluster is initdb'ed into a fresh temporary directory and started on a free
// 127.0.0.1 port with its socket in that directory, so it never touches a system-wide
// cluster. The binaries are found through $WALSHIP_PG_BINDIR, then PATH, then
// `pg_config --bindir`, then the newest /usr/lib/postgresql/*/bin. PostgreSQL refuses
// to run as root; when the process is root, every server program runs as the
// `postgres` user and the directories are handed to it.
//
// Everything waits on conditions (pg_ctl -w, an LSN reached, a file present) under the
// caller's context, never on fixed sleeps.
package lab
