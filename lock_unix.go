//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

// The serving process's lock on its database: its own file because it is a
// system call that not every system has (lock_other.go stands in there).

package main

import (
	"fmt"
	"os"
	"syscall"
)

// lockDatabase locks the database file for one server, until the file it
// returns is closed or the process ends, kill -9 included: the hub is the
// only writer of messages, and a second server's would never reach the
// first one's room. flock(2) is not SQLite's kind of lock (fcntl), so
// SQLite and `gochat backup` work beside it.
func lockDatabase(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open db %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s is in use by another gochat server (%w): one server per database", path, err)
	}
	return f, nil
}
