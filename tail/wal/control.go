package wal

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
)

// Control is what walship reads of a data directory's control file, global/pg_control,
// laid out alike from PostgreSQL 13 to 18 (pg_control.h, ControlFileData:
// system_identifier, pg_control_version, catalog_version_no, state, time, checkPoint,
// checkPointCopy (88 bytes, its redo and ThisTimeLineID first), unloggedLSN,
// minRecoveryPoint, minRecoveryPointTLI).
type Control struct {
	SysID      uint64
	Version    uint32 // pg_control_version
	State      DBState
	CheckPoint LSN    // the last checkpoint record's position
	TLI        uint32 // the last checkpoint's timeline
	// MinRecovery is how far recovery must replay before the data is consistent, on
	// timeline MinRecoveryTLI; zero when no such point is set (after a checkpoint of a
	// primary).
	MinRecovery    LSN
	MinRecoveryTLI uint32
}

// controlVersions are the pg_control_version values of the layout ReadControl knows:
// PostgreSQL 13 to 16 (1300), 17 (1700) and 18 (1800).
var controlVersions = map[uint32]bool{1300: true, 1700: true, 1800: true}

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
	if len(b) < 148 {
		return Control{}, fmt.Errorf("%s holds %d bytes: the file is cut short, or this is not a data directory", path, len(b))
	}
	le := binary.LittleEndian
	c := Control{SysID: le.Uint64(b), Version: le.Uint32(b[8:]), State: DBState(le.Uint32(b[16:])), CheckPoint: LSN(le.Uint64(b[32:])),
		TLI: le.Uint32(b[48:]), MinRecovery: LSN(le.Uint64(b[136:])), MinRecoveryTLI: le.Uint32(b[144:])}
	if !controlVersions[c.Version] {
		return Control{}, fmt.Errorf("%s: pg_control_version %d is not one of PostgreSQL 13 to 18's", path, c.Version)
	}
	return c, nil
}
