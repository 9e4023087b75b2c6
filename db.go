package main

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"time"

	_ "modernc.org/sqlite"
)

var (
	ErrNameTaken = errors.New("username taken") // in any letter case
	ErrNotFound  = errors.New("not found")      // no row matched
	ErrNotYours  = errors.New("not yours")      // another user's message
)

// migrations[v] brings the schema from version v (PRAGMA user_version) to
// v+1. Append a change as a new step, never edit one: every database, made
// by any release, then ends with the same schema. Step 0 is the schema the
// releases before versions made, so it creates only what is missing.
// Message ids are AUTOINCREMENT: never handed out twice, even after
// retention deleted the newest rows.
var migrations = []string{`
CREATE TABLE IF NOT EXISTS users (
	id         INTEGER PRIMARY KEY,
	username   TEXT NOT NULL UNIQUE COLLATE NOCASE,
	key_hash   BLOB NOT NULL UNIQUE,
	created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
	id         INTEGER PRIMARY KEY AUTOINCREMENT,
	author     TEXT NOT NULL,
	body       TEXT NOT NULL,
	created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_created_at ON messages(created_at);
CREATE TABLE IF NOT EXISTS bans (username TEXT PRIMARY KEY COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, checked_at INTEGER NOT NULL);
INSERT OR IGNORE INTO health VALUES (1, 0);
CREATE TABLE IF NOT EXISTS sessions (
	key       BLOB PRIMARY KEY,
	username  TEXT NOT NULL,
	last_used INTEGER NOT NULL
) WITHOUT ROWID;`, `
CREATE INDEX messages_live ON messages(id) WHERE author != '';
CREATE TABLE generation (id TEXT NOT NULL);
INSERT INTO generation VALUES (lower(hex(randomblob(8))));`,
}

// migrate takes the schema to its last version in one transaction: a
// failed step changes nothing, and a second process finds the work done.
func (s *Store) migrate() error {
	return s.inTx(func(tx *sql.Tx) error {
		var version int
		if err := tx.QueryRow(`PRAGMA user_version`).Scan(&version); err != nil {
			return err
		}
		if version > len(migrations) {
			return fmt.Errorf("schema version %d is newer than this gochat's %d", version, len(migrations))
		}
		for v := version; v < len(migrations); v++ {
			if _, err := tx.Exec(migrations[v]); err != nil {
				return fmt.Errorf("migrate to version %d: %w", v+1, err)
			}
		}
		_, err := tx.Exec(fmt.Sprintf(`PRAGMA user_version = %d`, len(migrations)))
		return err
	})
}

// Message is one stored chat message.
type Message struct {
	ID      int64
	Author  string
	Text    string
	Time    time.Time
	Deleted bool // a tombstone: its id stays taken, so a replay across it sees no hole
}

// Store is the SQLite database. Every write commits with synchronous=FULL
// before it returns: what the server answers for is on disk first.
//
// Its generation is a random id that every backup replaces in its copy: a
// restored database hands out again the ids of the messages it lost, and
// a client that names an id of another generation is told of a gap.
type Store struct {
	db         *sql.DB // the one writer: the hub's commits and its replays, sessions, bans
	read       *sql.DB // the HTTP API's reads, beside the writer (WAL), never queued behind it
	generation string
	path       string
	file       os.FileInfo // the file opened, to notice it being replaced
	metrics    *Metrics
}

// OpenStore opens the database at path, creating what is missing.
func OpenStore(path string, metrics *Metrics) (*Store, error) {
	// SQLite's own error for an unusable path is less clear than this one.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open db %s: %w", path, err)
	}
	info, err := f.Stat()
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("open db %s: %w", path, err)
	}
	// Transactions are immediate: a deferred one that reads, then writes,
	// fails at once if another process writes meanwhile. WAL is set only
	// once migrate has judged the file: a newer gochat's is left as it was.
	dsn := "file:" + (&url.URL{Path: path}).EscapedPath() + "?_pragma=busy_timeout(5000)&_pragma=synchronous(FULL)"
	db, _ := sql.Open("sqlite", dsn+"&_txlock=immediate") // no error: sql.Open only checks the driver's name
	read, _ := sql.Open("sqlite", dsn+"&_pragma=query_only(1)")
	// One writer: SQLite takes one at a time anyway, and database/sql's
	// queue is fairer and quicker than SQLite's busy wait.
	db.SetMaxOpenConns(1)
	read.SetMaxOpenConns(4)
	s := &Store{db: db, read: read, path: path, file: info, metrics: metrics}
	err = s.migrate()
	if err == nil {
		_, err = db.Exec(`PRAGMA journal_mode = WAL`)
	}
	if err == nil {
		err = db.QueryRow(`SELECT id FROM generation`).Scan(&s.generation)
	}
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("open db %s: %w", path, err)
	}
	return s, nil
}

// Close closes the database. Later calls do nothing.
func (s *Store) Close() error { return errors.Join(s.read.Close(), s.db.Close()) }

// Backup writes a consistent copy of the database to target, a new file
// readable by its owner only. The copy is made under a temporary name and
// linked to target once complete, on disk (VACUUM INTO syncs as the
// database does) and checked: a killed or failed backup leaves no file
// under target, and nothing is ever written over it.
func (s *Store) Backup(target string) error {
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s exists, or cannot be checked: not writing over it", target)
	}
	tmp, err := os.CreateTemp(filepath.Dir(target), filepath.Base(target)+".*.partial") // mode 0600
	if err != nil {
		return err
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	check := ""
	_, err = s.db.Exec(`VACUUM INTO ?1; ATTACH ?1 AS copy; UPDATE copy.generation SET id = lower(hex(randomblob(8)))`,
		tmp.Name())
	if err == nil {
		err = s.db.QueryRow(`PRAGMA copy.quick_check`).Scan(&check)
	}
	if err == nil && check != "ok" {
		err = errors.New(check)
	}
	if err != nil {
		return err
	}
	return os.Link(tmp.Name(), target) // unlike a rename, never over another file
}

// hashKey is what the database keeps of a key: a lookup by hash takes the
// same time however close a wrong key is.
func hashKey(key string) []byte {
	sum := sha256.Sum256([]byte(key))
	return sum[:]
}

// CreateUser stores a new user with the hash of key, or ErrNameTaken.
func (s *Store) CreateUser(ctx context.Context, name, key string) error {
	res, err := s.db.ExecContext(ctx, `INSERT INTO users(username, key_hash, created_at) VALUES(?, ?, ?)
		ON CONFLICT DO NOTHING`, name, hashKey(key), time.Now().Unix())
	if err != nil {
		return fmt.Errorf("insert user: %w", err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return ErrNameTaken
	}
	return nil
}

// UserByKey returns the name of the user whose key is key.
func (s *Store) UserByKey(ctx context.Context, key string) (name string, err error) {
	err = queryRow(ctx, s.read, `SELECT username FROM users WHERE key_hash = ?`, []any{hashKey(key)}, &name)
	return name, err
}

// UserByName returns the registered spelling of name, matched in any case.
func (s *Store) UserByName(ctx context.Context, name string) (string, error) {
	err := queryRow(ctx, s.read, `SELECT username FROM users WHERE username = ?`, []any{name}, &name)
	return name, err
}

// queryRow scans the one row query returns into dest, or ErrNotFound.
func queryRow(ctx context.Context, db *sql.DB, query string, args []any, dest ...any) error {
	err := db.QueryRowContext(ctx, query, args...).Scan(dest...)
	if errors.Is(err, sql.ErrNoRows) {
		return ErrNotFound
	}
	if err != nil {
		return fmt.Errorf("query: %w", err)
	}
	return nil
}

// Check reports whether the database can take a write, to the file that
// was opened: one replaced underneath loses writes at the next restart.
func (s *Store) Check(ctx context.Context) error {
	if info, err := os.Stat(s.path); err != nil || !os.SameFile(info, s.file) {
		return fmt.Errorf("database file %s was deleted or replaced", s.path)
	}
	_, err := s.db.ExecContext(ctx, `UPDATE health SET checked_at = ? WHERE id = 1`, time.Now().UnixNano())
	return err
}

// AddMessages stores msgs in one transaction and sets their ids.
func (s *Store) AddMessages(msgs []*Message) error {
	if len(msgs) == 0 {
		return nil
	}
	start := time.Now()
	defer func() { s.metrics.ObserveCommit(time.Since(start)) }()
	return s.inTx(func(tx *sql.Tx) error {
		for _, m := range msgs {
			res, err := tx.Exec(`INSERT INTO messages(author, body, created_at) VALUES(?, ?, ?)`,
				m.Author, m.Text, m.Time.UnixNano())
			if err == nil {
				m.ID, err = res.LastInsertId()
			}
			if err != nil {
				return fmt.Errorf("insert message: %w", err)
			}
		}
		return nil
	})
}

// inTx runs f in a transaction and commits it, or rolls it back on error.
func (s *Store) inTx(f func(tx *sql.Tx) error) error {
	tx, err := s.db.Begin()
	if err != nil {
		return err
	}
	if err := f(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// DeleteMessage wipes message id's author and text, leaving a tombstone
// so that replays know it was there. Unless author is "" (an admin), only
// author's own message goes: ErrNotYours for another's.
func (s *Store) DeleteMessage(ctx context.Context, id int64, author string) error {
	res, err := s.db.ExecContext(ctx, `UPDATE messages SET author = '', body = ''
		WHERE id = ?1 AND author != '' AND ?2 IN ('', author)`, id, author)
	if err != nil {
		return fmt.Errorf("delete message: %w", err)
	}
	if n, _ := res.RowsAffected(); n > 0 {
		return nil
	}
	if err := queryRow(ctx, s.db, `SELECT 1 FROM messages WHERE id = ? AND author != ''`, []any{id}, new(int)); err != nil {
		return err
	}
	return ErrNotYours
}

// LastMessageID returns the highest message id ever handed out, or 0.
func (s *Store) LastMessageID(ctx context.Context) (id int64, err error) {
	err = queryRow(ctx, s.db, `SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)`, nil, &id)
	return id, err
}

// retireBatch bounds one Retire, for which the hub waits.
const retireBatch = 500

// Retire deletes up to retireBatch of the messages stored before before,
// by their own time, and of those beyond the newest keep ids, and returns
// how many. By time, not by id: a message stored while the clock was set
// back is old by its time alone, and takes no newer ones with it.
func (s *Store) Retire(before time.Time, keep int) (int64, error) {
	res, err := s.db.Exec(`DELETE FROM messages WHERE id IN (
		SELECT id FROM (SELECT id FROM messages WHERE created_at < ?1 ORDER BY created_at LIMIT ?3) UNION
		SELECT id FROM (SELECT id FROM messages WHERE id <= (SELECT seq FROM sqlite_sequence WHERE name = 'messages') - ?2
			ORDER BY id LIMIT ?3) LIMIT ?3)`, before.UnixNano(), keep, retireBatch)
	if err != nil {
		return 0, fmt.Errorf("delete old messages: %w", err)
	}
	return res.RowsAffected()
}

// Messages returns the newest limit messages before id before, oldest
// first, for the HTTP API.
func (s *Store) Messages(ctx context.Context, before int64, limit int) ([]Message, error) {
	return messages(ctx, s.read, liveMessages, 0, before, limit)
}

// Replay returns the newest limit messages after id after, oldest first,
// tombstones too if asked: for the hub, on its own connection, so that it
// sees its last commit and waits for no one's reads.
func (s *Store) Replay(after int64, limit int, tombstones bool) ([]Message, error) {
	query := liveMessages
	if tombstones {
		query = allMessages
	}
	return messages(context.Background(), s.db, query, after, math.MaxInt64, limit)
}

// liveMessages skips tombstones through the index messages_live, which
// holds only the others: a run of deleted messages is not scanned. Its
// condition is written out, as SQLite uses a partial index only then.
const (
	liveMessages = `SELECT id, author, body, created_at FROM messages
	WHERE id > ?1 AND id < ?2 AND author != '' ORDER BY id DESC LIMIT ?3`
	allMessages = `SELECT id, author, body, created_at FROM messages
	WHERE id > ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3`
)

func messages(ctx context.Context, db *sql.DB, query string, after, before int64, limit int) ([]Message, error) {
	rows, err := db.QueryContext(ctx, query, after, before, limit)
	if err != nil {
		return nil, fmt.Errorf("query messages: %w", err)
	}
	defer rows.Close()
	msgs := []Message{}
	for rows.Next() {
		var m Message
		var nanos int64
		if err := rows.Scan(&m.ID, &m.Author, &m.Text, &nanos); err != nil {
			return nil, fmt.Errorf("scan message: %w", err)
		}
		m.Time, m.Deleted = time.Unix(0, nanos).UTC(), m.Author == ""
		msgs = append(msgs, m)
	}
	slices.Reverse(msgs)
	return msgs, rows.Err()
}
