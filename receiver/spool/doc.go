// Package spool owns a walship spool's on-disk format: the one place that knows which
// files a spool holds and what each means. The receiver writes WAL into a spool; the
// feeder (restore, promote, verify), the relay and every command that reads a spool go
// through this package, never around it.
//
// A spool directory holds:
//   - walship.json, the Identity: the cluster whose WAL it takes (Bind writes it once);
//   - published segments under their own names, whole and fsynced, and for each
//     timeline at most one <segment>.partial, the segment in progress, pre-sized with an
//     end block that says how many of its bytes were received and made durable (see
//     EndBlockSize; Writer writes both; Scan lists them, counting only the bytes
//     certainly durable, for it cannot tell whether the newest end's fdatasync has
//     returned);
//   - .walship.spare, a pre-sized file kept ready for the next partial;
//   - timeline history files, published whole;
//   - walship.end, the end-of-WAL mark of a drained primary (WriteEnd, ClearEnd);
//   - walship.session, the running receiver's sidecar session, or since when it has had
//     none (WriteSession);
//   - walship.start, where the WAL of a spool that holds none is to start (WriteStart);
//   - walship.freeze and walship.promote, the freeze marker and the promotion trigger
//     (Freeze, WriteTrigger, Unfreeze);
//   - two lock files: one receiver process per spool (LockReceiver), one writer at a
//     time (LockWriter);
//   - .walship.sock, the running receiver's control socket (ControlSocket), through
//     which walship standby init reaches the sidecar;
//   - leftovers of interrupted publishes (durable.TempPrefix), which Recover removes.
//
// Duties of a writer, in order: hold LockWriter; check Frozen after taking it (a
// promotion makes the marker first and takes the lock second, so one of the two sees the
// other); Recover before the first write; acknowledge only what Sync has made durable;
// after a failed fdatasync, which poisons the Writer, Recover again and take a new one.
package spool
