package tail

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// serverState says whether a server's processes have all exited, as PostgreSQL itself
// decides before it reuses a data directory: postmaster.pid is gone (a clean stop), or
// its postmaster is dead and nothing is attached to the shared memory segment it names
// any more. The backends of a killed postmaster live on until they notice, and can
// still write and flush WAL, commits included; only when they are gone is pg_wal final.
//
// It needs to see the server's processes and System V shared memory: the same host, or
// a container sharing the server's PID and IPC namespaces.
func serverState(pgdata string) (gone bool, why string, err error) {
	path := filepath.Join(pgdata, "postmaster.pid")
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return true, "postmaster.pid is gone: the server was stopped", nil
	}
	if err != nil {
		return false, "", err
	}
	// pidfile.h: line 1 is the postmaster's PID, line 7 the shared memory key and ID.
	lines := strings.Split(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(lines[0]))
	if err != nil || pid <= 0 {
		// A postmaster that is starting has not written the file whole yet.
		return false, fmt.Sprintf("%s names no process yet", path), nil
	}
	switch err := unix.Kill(pid, 0); {
	case (err == nil || errors.Is(err, unix.EPERM)) && !zombie(pid):
		return false, fmt.Sprintf("the postmaster (PID %d) is running", pid), nil
	case err == nil || errors.Is(err, unix.EPERM):
		// Dead, but not yet reaped by its parent (an init that does not reap, in a
		// container): it holds nothing any more.
	case !errors.Is(err, unix.ESRCH):
		return false, "", fmt.Errorf("signal the postmaster (PID %d): %w", pid, err)
	}
	if len(lines) < 7 {
		return true, fmt.Sprintf("the postmaster (PID %d) is dead", pid), nil
	}
	fields := strings.Fields(lines[6])
	if len(fields) != 2 {
		return true, fmt.Sprintf("the postmaster (PID %d) is dead", pid), nil
	}
	shmid, err := strconv.Atoi(fields[1])
	if err != nil {
		return false, "", fmt.Errorf("%s: shared memory id %q: %w", path, fields[1], err)
	}
	var ds unix.SysvShmDesc
	_, err = unix.SysvShmCtl(shmid, unix.IPC_STAT, &ds)
	switch {
	case errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EIDRM):
		return true, fmt.Sprintf("the postmaster (PID %d) is dead and its shared memory removed", pid), nil
	case err != nil:
		return false, "", fmt.Errorf("the postmaster (PID %d) is dead, but its shared memory %d cannot be checked for live backends: %w", pid, shmid, err)
	case ds.Nattch > 0:
		return false, fmt.Sprintf("the postmaster (PID %d) is dead, %d processes of it still run", pid, ds.Nattch), nil
	}
	return true, fmt.Sprintf("the postmaster (PID %d) and all its processes are dead", pid), nil
}

// zombie says whether process pid has exited and waits to be reaped (state Z in
// /proc/PID/stat, the field after the parenthesised command name).
func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i >= 0 && i+2 < len(b) && b[i+2] == 'Z'
}
