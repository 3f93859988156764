// Package feeder hands WAL from a walship spool to PostgreSQL's recovery.
//
// Restore is the restore_command: it copies a published segment (or a history file) to
// the path recovery names, after checking its size and page headers, and never hands
// over anything short or half-written. After a promotion trigger it hands the frozen
// partial segment, zero-padded to the segment size so that recovery sees the end of
// WAL right after the last byte received, and answers "not available" for any later
// segment, so that recovery ends there.
//
// Promote runs the failover, in this order:
//  1. check that the spool belongs to the standby's cluster and the standby is in recovery;
//  2. freeze the spool (spool.FreezeFile) and wait for the writer lock, so that no
//     receiver, running or restarted, writes into it again;
//  3. write the trigger (spool.TriggerFile): the partial segment and how many of its
//     bytes recovery gets, with their hash;
//  4. ask the server to promote (pg_promote() in standby mode; in archive recovery the
//     waiting restore_command sees the trigger itself);
//  5. wait until the server accepts writes, and report where recovery ended.
//
// What is frozen is never changed afterwards. Nothing here exits; cmd/walship maps the
// errors to exit statuses.
package feeder
