//go:build linux

// Tests that fill the disk of a running server, with Linux's prlimit.

package main

import (
	"fmt"
	"path/filepath"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// A logout or a ban that cannot reach the disk (here: a file size limit put
// on the running server, as a full disk would) answers 500 and changes
// nothing: the session works as before, and after a restart too, rather
// than dying now and coming back later.
func TestFailedLogoutAndBanChangeNothing(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "chat.db")
	p := startProcess(t, "-db", db, "-admins", "Boss")
	s := p.asServer(t)
	boss, victim := s.user(t, "Boss"), s.user(t, "Victim")
	// Every commit from now on would have to grow the database's WAL file.
	limit := syscall.Rlimit{Cur: 1, Max: 1}
	if _, _, errno := syscall.RawSyscall6(syscall.SYS_PRLIMIT64, uintptr(p.cmd.Process.Pid), syscall.RLIMIT_FSIZE,
		uintptr(unsafe.Pointer(&limit)), 0, 0, 0); errno != 0 {
		t.Fatalf("prlimit: %v", errno)
	}
	s.request(t, "POST", "/api/logout", "", victim).expect(t, 500)
	s.request(t, "POST", "/api/user/Victim/ban", "", boss).expect(t, 500)
	s.request(t, "GET", "/api/user/@me", "", victim).expect(t, 200)
	p.cmd.Process.Kill()
	p.wait(t, 10*time.Second)

	s = startServer(t, "-db", db, "-admins", "Boss")
	s.request(t, "GET", "/api/user/@me", "", victim).expect(t, 200)
	if r := s.request(t, "GET", "/api/bans", "", boss).expect(t, 200); fmt.Sprint(r.body["bans"]) != "[]" {
		t.Fatalf("a failed ban came back after a restart: %s", r.raw)
	}
}
