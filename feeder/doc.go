// Package feeder hands WAL from a walship spool to PostgreSQL's recovery: the
// restore_command side of walship and the promotion of a standby with the spool's
// partial tail.
package feeder
