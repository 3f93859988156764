// Package tail ships WAL to a walship receiver: the sidecar beside a primary, and the
// relay that ships a receiver's spool onward. Both are a Tailer: one session loop over
// a Source, a Primary (its pg_wal, up to the flush position it reads) or a Spool (its
// files, up to the receiver's durable position).
//
// A session, in order:
//  1. the source begins: a primary is connected to, waited for while it is in recovery,
//     and its pg_wal checked against the server's version and cluster;
//  2. the handshake with the receiver, whose welcome says where its spool ends;
//     startAt (plan.go, pure) decides where shipping starts;
//  3. a timeline above 1 sends its history file before any segment;
//  4. the loop: ship [from, end) in chunks (nextChunk), then wait and read the end
//     again. Never a byte at or past the end: past a primary's flush position a recycled
//     segment holds stale pages.
//
// Acknowledgements come only from the receiver (welcome and acks), never from what was
// sent: they are what the replication slot (SlotKeeper) holds WAL for. When a primary's
// server is lost, its WAL is drained past the last flush position read (drain.go); a
// relay passes the spool's end-of-WAL mark on.
package tail
