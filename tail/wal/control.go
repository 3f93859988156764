package wal

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
)

// Control is what walship reads of a data directory's control file, global/pg_control:
// the fields at its head, laid out alike from PostgreSQL 9.3 on (pg_control.h,
// ControlFileData: system_identifier, pg_control_version, catalog_version_no, state,
// time, checkPoint, then checkPointCopy, whose redo and ThisTimeLineID come first).
type Control struct {
	SysID      uint64
	State      DBState
	CheckPoint LSN    // the last checkpoint record's position
	TLI        uint32 // the last checkpoint's timeline
}

// DBState is the cluster state the control file records (pg_control.h).
type DBState uint32

// The states of pg_control.h.
const (
	DBStartup           DBState = 0
	DBShutdowned        DBState = 1
	DBShutdownedInRecov DBState = 2
	DBShutdowning       DBState = 3
	DBInCrashRecovery   DBState = 4
	DBInArchiveRecovery DBState = 5
	DBInProduction      DBState = 6
)

func (s DBState) String() string {
	switch s {
	case DBStartup:
		return "starting up"
	case DBShutdowned:
		return "shut down"
	case DBShutdownedInRecov:
		return "shut down in recovery"
	case DBShutdowning:
		return "shutting down"
	case DBInCrashRecovery:
		return "in crash recovery"
	case DBInArchiveRecovery:
		return "in archive recovery"
	case DBInProduction:
		return "in production"
	}
	return fmt.Sprintf("state %d", uint32(s))
}

// ReadControl reads the control file of the data directory pgdata.
func ReadControl(pgdata string) (Control, error) {
	path := filepath.Join(pgdata, "global", "pg_control")
	b, err := os.ReadFile(path)
	if err != nil {
		return Control{}, err
	}
	if len(b) < 52 {
		return Control{}, fmt.Errorf("%s holds %d bytes: the file is cut short, or this is not a data directory", path, len(b))
	}
	le := binary.LittleEndian
	return Control{SysID: le.Uint64(b), State: DBState(le.Uint32(b[16:])), CheckPoint: LSN(le.Uint64(b[32:])), TLI: le.Uint32(b[48:])}, nil
}
