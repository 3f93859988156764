package wal

import (
	"database/sql/driver"
	"fmt"
	"strconv"
	"strings"
)

// LSN is a position in the write-ahead log: a byte offset into the WAL stream.
//
// It reads and writes itself as PostgreSQL prints it, "16/B374D848": in JSON and other
// text encodings (MarshalText, UnmarshalText), and in queries, where it scans a pg_lsn
// or text column and is sent as text (Scan, Value), so that a position is parsed once,
// where it enters, and compared as a number everywhere else.
type LSN uint64

// String formats the LSN as PostgreSQL does: two hexadecimal halves, "16/B374D848".
func (l LSN) String() string {
	return fmt.Sprintf("%X/%X", uint32(l>>32), uint32(l))
}

// ParseLSN parses the "hi/lo" form that PostgreSQL prints.
func ParseLSN(s string) (LSN, error) {
	hi, lo, ok := strings.Cut(s, "/")
	if !ok || hi == "" || lo == "" || len(hi) > 8 || len(lo) > 8 {
		return 0, fmt.Errorf("parse lsn %q: want the form HI/LO in hexadecimal", s)
	}
	h, err := strconv.ParseUint(hi, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("parse lsn %q: %w", s, err)
	}
	l, err := strconv.ParseUint(lo, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("parse lsn %q: %w", s, err)
	}
	return LSN(h<<32 | l), nil
}

// MarshalText writes the LSN as String does.
func (l LSN) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// UnmarshalText parses the form String writes.
func (l *LSN) UnmarshalText(b []byte) error {
	v, err := ParseLSN(string(b))
	if err != nil {
		return err
	}
	*l = v
	return nil
}

// Scan reads a pg_lsn or text column (database/sql.Scanner, which pgx honours). NULL
// is an error: a caller that expects one scans into a *LSN pointer instead.
func (l *LSN) Scan(src any) error {
	switch v := src.(type) {
	case string:
		return l.UnmarshalText([]byte(v))
	case []byte:
		return l.UnmarshalText(v)
	case nil:
		return fmt.Errorf("scan lsn: NULL")
	}
	return fmt.Errorf("scan lsn: cannot read %T", src)
}

// Value sends the LSN as text, which PostgreSQL casts to pg_lsn (driver.Valuer).
func (l LSN) Value() (driver.Value, error) { return l.String(), nil }

// Position is a place in one timeline's WAL.
type Position struct {
	TLI uint32 `json:"timeline"`
	LSN LSN    `json:"lsn"`
}

func (p Position) String() string { return fmt.Sprintf("%s on timeline %d", p.LSN, p.TLI) }
