// Moderation: admins (-admins) delete messages and ban users. Its own file
// because it reaches into the store, the sessions and the hub; the bans'
// table is read and written here too.

package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
)

// admin returns the request's user if an admin, else answers 422/401/403.
func admin(w http.ResponseWriter, r *http.Request, sessions *Sessions, admins map[string]bool) (string, bool) {
	user, _, ok := authenticate(w, r, sessions)
	if ok && !isAdmin(admins, user) {
		writeError(w, http.StatusForbidden, "admins only")
		return "", false
	}
	return user, ok
}

// isAdmin reports whether name is one of -admins, in any letter case.
func isAdmin(admins map[string]bool, name string) bool { return admins[strings.ToLower(name)] }

// handleDeleteMessage deletes a message, its author's own or any for an
// admin, and tells everyone, in one step of the hub.
func handleDeleteMessage(sessions *Sessions, hub *Hub, admins map[string]bool, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		by, _, ok := authenticate(w, r, sessions)
		if !ok {
			return
		}
		id, ok := parseUint(r.PathValue("id"))
		err := ErrNotFound // an id that is not a number names no message
		if ok {
			d := deletion{id, by, make(chan error, 1)}
			if isAdmin(admins, by) {
				d.author = ""
			}
			err = hub.ask(d, d.result)
		}
		switch {
		case errors.Is(err, ErrNotFound):
			writeError(w, http.StatusNotFound, "no such message")
		case errors.Is(err, ErrNotYours):
			writeError(w, http.StatusForbidden, "only its author or an admin may delete a message")
		case err != nil:
			internalError(w, log, r, err)
		default:
			log.Info("message deleted", "id", id, "by", by)
			w.WriteHeader(http.StatusNoContent)
		}
	})
}

// handleBans lists the banned users, for admins.
func handleBans(store *Store, sessions *Sessions, admins map[string]bool, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, ok := admin(w, r, sessions, admins); !ok {
			return
		}
		if bans, err := store.Bans(r.Context()); err != nil {
			internalError(w, log, r, err)
		} else {
			writeJSON(w, http.StatusOK, map[string][]string{"bans": bans})
		}
	})
}

// handleBan bans a user (POST), ending their sessions and socket (1008),
// or lifts the ban (DELETE). Admins cannot be banned.
func handleBan(store *Store, sessions *Sessions, hub *Hub, admins map[string]bool, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		by, ok := admin(w, r, sessions, admins)
		if !ok {
			return
		}
		name, err := store.UserByName(r.Context(), r.PathValue("name"))
		banning := r.Method == http.MethodPost
		if err == nil && banning && isAdmin(admins, name) {
			writeError(w, http.StatusForbidden, "an admin cannot be banned")
			return
		}
		if err == nil {
			err = sessions.SetBanned(r.Context(), name, banning)
		}
		switch {
		case errors.Is(err, ErrNotFound):
			writeError(w, http.StatusNotFound, "no such user")
		case err != nil:
			internalError(w, log, r, err)
		default:
			if banning {
				hub.send(kick{name, "", closePolicyViolation})
			}
			log.Info("ban", "user", name, "banned", banning, "admin", by)
			writeJSON(w, http.StatusOK, struct{}{})
		}
	})
}

// SetBanned bans name, deleting their sessions, or lifts the ban.
func (s *Store) SetBanned(ctx context.Context, name string, banned bool) error {
	query := `DELETE FROM bans WHERE username = ?1`
	if banned {
		query = `INSERT OR IGNORE INTO bans(username) VALUES(?1); DELETE FROM sessions WHERE username = ?1 COLLATE NOCASE`
	}
	if err := s.inTx(func(tx *sql.Tx) error { _, err := tx.ExecContext(ctx, query, name); return err }); err != nil {
		return fmt.Errorf("ban: %w", err)
	}
	return nil
}

// Bans returns the banned names, as registered, sorted.
func (s *Store) Bans(ctx context.Context) ([]string, error) {
	rows, err := s.read.QueryContext(ctx, `SELECT username FROM bans ORDER BY username`)
	if err != nil {
		return nil, fmt.Errorf("load bans: %w", err)
	}
	defer rows.Close()
	bans := []string{}
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, fmt.Errorf("load bans: %w", err)
		}
		bans = append(bans, name)
	}
	return bans, rows.Err()
}
