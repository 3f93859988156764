package wal

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// HistoryEntry is one line of a timeline history file: timeline TLI ended at Switch,
// where its child began (timeline.c: readTimeLineHistory).
type HistoryEntry struct {
	TLI    uint32
	Switch LSN
}

// ParseHistory parses a history file. Blank lines and lines starting with '#' are
// skipped; timelines must ascend.
func ParseHistory(b []byte) ([]HistoryEntry, error) {
	var out []HistoryEntry
	sc := bufio.NewScanner(bytes.NewReader(b))
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		fields := strings.Fields(text)
		if len(fields) < 2 {
			return nil, fmt.Errorf("history line %d: %q: want a timeline and a switch point", line, text)
		}
		tli, err := strconv.ParseUint(fields[0], 10, 32)
		if err != nil || tli == 0 {
			return nil, fmt.Errorf("history line %d: timeline %q: not a positive number", line, fields[0])
		}
		lsn, err := ParseLSN(fields[1])
		if err != nil {
			return nil, fmt.Errorf("history line %d: %w", line, err)
		}
		if n := len(out); n > 0 && uint32(tli) <= out[n-1].TLI {
			return nil, fmt.Errorf("history line %d: timeline %d does not ascend", line, tli)
		}
		out = append(out, HistoryEntry{TLI: uint32(tli), Switch: lsn})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("history file has no entries")
	}
	return out, nil
}
