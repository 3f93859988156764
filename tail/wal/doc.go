// Package wal owns the parts of PostgreSQL's write-ahead log format that walship
// needs everywhere: the LSN, WAL segment names, and the page headers that start every
// WAL page.
//
// The format code is pure: no clock, no global state, and no I/O but through a Source,
// which the caller supplies (Files reads segment files; Bytes is WAL in memory). The
// segment size is never a package variable; it is read from the server
// (wal_segment_size) and carried in values.
//
// Facts relied on (PostgreSQL src/include/access/xlog_internal.h, xlogdefs.h):
//   - segment number = lsn / wal_segment_size, offset = lsn % wal_segment_size. We compute
//     both ourselves instead of calling pg_walfile_name_offset(), which up to PostgreSQL 16
//     names the previous file at an exact segment boundary.
//   - a segment file is named TTTTTTTTXXXXXXXXYYYYYYYY: timeline, then segment number
//     split into "log" (segno / segments-per-4GiB) and "seg" (segno % segments-per-4GiB).
//   - every XLOG_BLCKSZ page starts with XLogPageHeaderData (24 bytes once MAXALIGNed);
//     the first page of a segment has XLogLongPageHeaderData (40 bytes), which adds the
//     system identifier, the segment size and the block size.
package wal
