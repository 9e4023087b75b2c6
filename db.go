package main

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"sync"
	"time"

	_ "modernc.org/sqlite"
)

// ErrNameTaken is returned by Store.CreateUser when the name is already
// registered, compared case-insensitively.
var ErrNameTaken = errors.New("username taken")

// ErrNotFound is returned when a lookup matches no row.
var ErrNotFound = errors.New("not found")

// ErrStoreClosed is returned for writes submitted after Store.Close.
var ErrStoreClosed = errors.New("store closed")

// maxBatch bounds one group-commit transaction so a flood of writes cannot
// hold the write lock (and delay everyone's acknowledgement) for long.
const maxBatch = 512

// schema is applied in order; PRAGMA user_version records how many steps a
// database has seen, so an old file is migrated forward on start.
var schema = []string{
	`CREATE TABLE users (
		id         INTEGER PRIMARY KEY,
		username   TEXT NOT NULL UNIQUE COLLATE NOCASE,
		key_hash   BLOB NOT NULL UNIQUE,
		created_at INTEGER NOT NULL
	)`,
	// AUTOINCREMENT so that an id is never handed out twice, even after
	// retention deleted the newest rows' predecessors.
	`CREATE TABLE messages (
		id         INTEGER PRIMARY KEY AUTOINCREMENT,
		author     TEXT NOT NULL,
		body       TEXT NOT NULL,
		created_at INTEGER NOT NULL
	)`,
	`CREATE INDEX messages_created_at ON messages(created_at)`,
	// Only a hash of each session id; see sessions.go.
	`CREATE TABLE sessions (
		key       BLOB PRIMARY KEY,
		username  TEXT NOT NULL,
		last_used INTEGER NOT NULL
	) WITHOUT ROWID`,
}

// Message is one stored chat message.
type Message struct {
	ID     int64
	Author string
	Text   string
	Time   time.Time
}

// Store is the SQLite database. Reads use the connection pool; every write
// goes through one writer goroutine, which commits whatever arrived while the
// previous transaction was syncing as one transaction (group commit). A single
// writer also means no two write transactions ever contend for the lock.
type Store struct {
	db     *sql.DB
	writes chan writeOp

	closeOnce sync.Once
	stop      chan struct{}
	stopped   chan struct{}
}

// writeOp is one unit of work for the writer. apply runs inside the batch's
// transaction; done is called once the batch committed (err == nil) or
// failed, with the first error that concerns this op.
type writeOp struct {
	apply func(tx *sql.Tx) error
	done  func(err error)
}

// OpenStore opens (creating if needed) the database at path, migrates its
// schema and starts the writer.
func OpenStore(path string) (*Store, error) {
	if err := checkDBFile(path); err != nil {
		return nil, err
	}
	dsn := "file:" + (&url.URL{Path: path}).EscapedPath() +
		"?_pragma=busy_timeout(5000)&_pragma=journal_mode(WAL)" +
		"&_pragma=synchronous(FULL)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open db %s: %w", path, err)
	}
	db.SetMaxOpenConns(8)
	db.SetMaxIdleConns(8)
	if err := migrate(db); err != nil {
		db.Close()
		return nil, fmt.Errorf("open db %s: %w", path, err)
	}
	s := &Store{
		db:      db,
		writes:  make(chan writeOp, maxBatch),
		stop:    make(chan struct{}),
		stopped: make(chan struct{}),
	}
	go s.writer()
	return s, nil
}

// checkDBFile reports a database path that cannot work before SQLite gets
// to it, where its own errors would be less clear.
func checkDBFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open db %s: %w", path, err)
	}
	return f.Close()
}

func migrate(db *sql.DB) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var check string
	if err := db.QueryRowContext(ctx, "PRAGMA quick_check").Scan(&check); err != nil {
		return fmt.Errorf("check database: %w", err)
	}
	if check != "ok" {
		return fmt.Errorf("database is corrupt: %s", check)
	}
	var version int
	if err := db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if version > len(schema) {
		return fmt.Errorf("database schema version %d is newer than this program (%d)", version, len(schema))
	}
	for i := version; i < len(schema); i++ {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("migrate to %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, schema[i]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate to %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", i+1)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate to %d: %w", i+1, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migrate to %d: %w", i+1, err)
		}
	}
	return nil
}

// Close stops the writer after it has committed every write already
// submitted, then closes the database.
func (s *Store) Close() error {
	s.closeOnce.Do(func() { close(s.stop) })
	<-s.stopped
	return s.db.Close()
}

// submit hands op to the writer. It fails only when the store is closing.
func (s *Store) submit(op writeOp) error {
	select {
	case <-s.stop:
		return ErrStoreClosed
	default:
	}
	select {
	case s.writes <- op:
		return nil
	case <-s.stop:
		return ErrStoreClosed
	}
}

// write runs apply in the next batch and waits for it to be committed.
func (s *Store) write(ctx context.Context, apply func(tx *sql.Tx) error) error {
	result := make(chan error, 1)
	op := writeOp{apply: apply, done: func(err error) { result <- err }}
	if err := s.submit(op); err != nil {
		return err
	}
	select {
	case err := <-result:
		return err
	case <-ctx.Done():
		// The op may still commit; the caller only stops waiting for it.
		return ctx.Err()
	}
}

func (s *Store) writer() {
	defer close(s.stopped)
	batch := make([]writeOp, 0, maxBatch)
	for {
		select {
		case op := <-s.writes:
			batch = s.collect(append(batch[:0], op))
			s.commit(batch)
		case <-s.stop:
			// submit may still be handing over ops that raced with stop.
			for {
				select {
				case op := <-s.writes:
					s.commit(s.collect(append(batch[:0], op)))
				default:
					return
				}
			}
		}
	}
}

// collect adds every op already waiting, up to maxBatch.
func (s *Store) collect(batch []writeOp) []writeOp {
	for len(batch) < maxBatch {
		select {
		case op := <-s.writes:
			batch = append(batch, op)
		default:
			return batch
		}
	}
	return batch
}

// commit runs batch in one transaction. An op whose statement fails is
// rolled back alone by SQLite (statement rollback); the others still commit.
func (s *Store) commit(batch []writeOp) {
	errs := make([]error, len(batch))
	err := s.inTx(func(tx *sql.Tx) error {
		for i, op := range batch {
			errs[i] = op.apply(tx)
		}
		return nil
	})
	for i, op := range batch {
		if err != nil {
			op.done(err)
		} else {
			op.done(errs[i])
		}
	}
}

func (s *Store) inTx(f func(tx *sql.Tx) error) error {
	tx, err := s.db.Begin()
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	if err := f(tx); err != nil {
		tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// hashKey is what the database keeps of a key: a lookup by hash never
// compares secrets byte by byte, so it takes the same time however close a
// wrong key is.
func hashKey(key string) []byte {
	sum := sha256.Sum256([]byte(key))
	return sum[:]
}

// CreateUser stores a new user with the hash of key. It returns ErrNameTaken
// when the name exists in any letter case.
func (s *Store) CreateUser(ctx context.Context, name, key string) error {
	taken := false
	err := s.write(ctx, func(tx *sql.Tx) error {
		res, err := tx.Exec(`INSERT INTO users(username, key_hash, created_at) VALUES(?, ?, ?)
			ON CONFLICT DO NOTHING`, name, hashKey(key), time.Now().Unix())
		if err != nil {
			return fmt.Errorf("insert user: %w", err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			return fmt.Errorf("insert user: %w", err)
		}
		taken = n == 0
		return nil
	})
	if err != nil {
		return err
	}
	if taken {
		return ErrNameTaken
	}
	return nil
}

// UserByKey returns the name of the user whose key is key.
func (s *Store) UserByKey(ctx context.Context, key string) (string, error) {
	return s.queryName(ctx, `SELECT username FROM users WHERE key_hash = ?`, hashKey(key))
}

// UserByName returns the registered spelling of name, matched in any case.
func (s *Store) UserByName(ctx context.Context, name string) (string, error) {
	return s.queryName(ctx, `SELECT username FROM users WHERE username = ?`, name)
}

func (s *Store) queryName(ctx context.Context, query string, arg any) (string, error) {
	var name string
	err := s.db.QueryRowContext(ctx, query, arg).Scan(&name)
	if errors.Is(err, sql.ErrNoRows) {
		return "", ErrNotFound
	}
	if err != nil {
		return "", fmt.Errorf("look up user: %w", err)
	}
	return name, nil
}

// Ping reports whether the database answers a query.
func (s *Store) Ping(ctx context.Context) error {
	var one int
	if err := s.db.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
		return fmt.Errorf("ping db: %w", err)
	}
	return nil
}

// SubmitMessage queues m for storage without waiting: done is called from
// the writer goroutine after commit, with m.ID set, or with the error. Calls
// to done follow commit order, which is id order.
func (s *Store) SubmitMessage(m *Message, done func(err error)) error {
	return s.submit(writeOp{
		apply: func(tx *sql.Tx) error {
			res, err := tx.Exec(`INSERT INTO messages(author, body, created_at) VALUES(?, ?, ?)`,
				m.Author, m.Text, m.Time.UnixNano())
			if err != nil {
				return fmt.Errorf("insert message: %w", err)
			}
			if m.ID, err = res.LastInsertId(); err != nil {
				return fmt.Errorf("insert message: %w", err)
			}
			return nil
		},
		done: done,
	})
}

// LastMessageID returns the highest message id ever handed out, deleted or
// not, or 0.
func (s *Store) LastMessageID(ctx context.Context) (int64, error) {
	var id int64
	err := s.db.QueryRowContext(ctx, `SELECT seq FROM sqlite_sequence WHERE name = 'messages'`).Scan(&id)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return 0, fmt.Errorf("read last message id: %w", err)
	}
	return id, nil
}

// Messages returns up to limit stored messages with id < before (any id when
// before is 0), oldest first.
func (s *Store) Messages(ctx context.Context, before int64, limit int) ([]Message, error) {
	if before <= 0 {
		before = 1<<63 - 1
	}
	rows, err := s.db.QueryContext(ctx, `SELECT id, author, body, created_at FROM messages
		WHERE id < ? ORDER BY id DESC LIMIT ?`, before, limit)
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
		m.Time = time.Unix(0, nanos).UTC()
		msgs = append(msgs, m)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("query messages: %w", err)
	}
	for i, j := 0, len(msgs)-1; i < j; i, j = i+1, j-1 {
		msgs[i], msgs[j] = msgs[j], msgs[i]
	}
	return msgs, nil
}

// DeleteMessagesBefore deletes messages older than cutoff in batches of
// batchSize, one short transaction each, so that live writes wait for at
// most one batch. It returns how many it deleted and the highest id deleted.
func (s *Store) DeleteMessagesBefore(ctx context.Context, cutoff time.Time, batchSize int) (int64, int64, error) {
	var total, maxID int64
	for {
		var n, batchMax int64
		err := s.write(ctx, func(tx *sql.Tx) error {
			err := tx.QueryRow(`SELECT COUNT(*), COALESCE(MAX(id), 0) FROM (
				SELECT id FROM messages WHERE created_at < ? ORDER BY id LIMIT ?)`,
				cutoff.UnixNano(), batchSize).Scan(&n, &batchMax)
			if err != nil || n == 0 {
				return err
			}
			_, err = tx.Exec(`DELETE FROM messages WHERE id <= ? AND created_at < ?`, batchMax, cutoff.UnixNano())
			return err
		})
		if err != nil {
			return total, maxID, fmt.Errorf("delete old messages: %w", err)
		}
		total += n
		maxID = max(maxID, batchMax)
		if n < int64(batchSize) {
			return total, maxID, nil
		}
	}
}

// exec runs one statement in the next batch and waits for its commit.
func (s *Store) exec(ctx context.Context, query string, args ...any) error {
	return s.write(ctx, func(tx *sql.Tx) error {
		_, err := tx.Exec(query, args...)
		return err
	})
}

// SaveSession stores a new session, durably.
func (s *Store) SaveSession(ctx context.Context, key []byte, user string, lastUsed time.Time) error {
	return s.exec(ctx, `INSERT OR REPLACE INTO sessions(key, username, last_used) VALUES(?, ?, ?)`,
		key, user, lastUsed.UnixNano())
}

// DeleteSession removes a session.
func (s *Store) DeleteSession(ctx context.Context, key []byte) error {
	return s.exec(ctx, `DELETE FROM sessions WHERE key = ?`, key)
}

// TouchSessions records the last use of sessions, keyed by session key.
func (s *Store) TouchSessions(ctx context.Context, used map[string]time.Time) error {
	if len(used) == 0 {
		return nil
	}
	return s.write(ctx, func(tx *sql.Tx) error {
		stmt, err := tx.Prepare(`UPDATE sessions SET last_used = max(last_used, ?) WHERE key = ?`)
		if err != nil {
			return err
		}
		defer stmt.Close()
		for key, at := range used {
			if _, err := stmt.Exec(at.UnixNano(), []byte(key)); err != nil {
				return err
			}
		}
		return nil
	})
}

// DeleteSessionsBefore removes sessions last used before cutoff.
func (s *Store) DeleteSessionsBefore(ctx context.Context, cutoff time.Time) error {
	return s.exec(ctx, `DELETE FROM sessions WHERE last_used < ?`, cutoff.UnixNano())
}

// LoadSessions calls each for every session last used at or after since.
func (s *Store) LoadSessions(ctx context.Context, since time.Time, each func(key []byte, user string, lastUsed time.Time)) error {
	rows, err := s.db.QueryContext(ctx, `SELECT key, username, last_used FROM sessions WHERE last_used >= ?`, since.UnixNano())
	if err != nil {
		return fmt.Errorf("load sessions: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var key []byte
		var user string
		var nanos int64
		if err := rows.Scan(&key, &user, &nanos); err != nil {
			return fmt.Errorf("load sessions: %w", err)
		}
		each(key, user, time.Unix(0, nanos))
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("load sessions: %w", err)
	}
	return nil
}
