//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

// lock_unix.go's stand-in where flock(2) is missing.

package main

import "os"

// lockDatabase takes no lock here: one server per database is the
// operator's to keep.
func lockDatabase(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
}
