package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"runtime/debug"
	"slices"
	"sort"
	"strings"
	"time"
)

// Hub owns the set of connected clients and the order of everything sent to
// them. Only its goroutine (Run) touches clients and recent, so every
// receiver sees messages and events in the one order the hub handled them,
// and a history replay can never miss or repeat a live message.
type Hub struct {
	log          *slog.Logger
	maxConns     int
	history      int // messages replayed to a plain connect
	replayMax    int // messages replayed to a connect with ?since=
	pingInterval time.Duration

	work chan func() // everything the hub does for others, in arrival order
	quit chan int    // carries the close code for every client
	done chan struct{}

	clients          map[string]*client // by lower-case user name, reserved or active
	dirty            []*client          // clients with frames queued since the last flush
	scratch          net.Buffers        // reused by flush, so that a write allocates nothing
	queuedSinceFlush int
	peak             int              // most clients since memory was last released
	recent           []Message        // newest stored messages, ascending id
	frames           map[int64][]byte // cached history frames of recent, by id
	lastID           int64            // highest message id ever stored
	closing          bool             // shutting down: refuse new clients
}

// HubConfig holds the limits a Hub enforces.
type HubConfig struct {
	MaxConns     int
	History      int
	ReplayMax    int
	PingInterval time.Duration
}

type reserveResult int

const (
	reserved reserveResult = iota
	reserveTaken
	reserveFull
)

// NewHub returns a hub that replays the given stored messages (ascending id)
// as history. lastID is the highest id ever handed out.
func NewHub(cfg HubConfig, recent []Message, lastID int64, log *slog.Logger) *Hub {
	h := &Hub{
		log:          log,
		maxConns:     cfg.MaxConns,
		history:      cfg.History,
		replayMax:    cfg.ReplayMax,
		pingInterval: cfg.PingInterval,
		work:         make(chan func(), 1024),
		quit:         make(chan int),
		done:         make(chan struct{}),
		clients:      make(map[string]*client),
		frames:       make(map[int64][]byte),
		lastID:       lastID,
	}
	h.recent = append(h.recent, recent...)
	h.trimRecent()
	return h
}

// recentCap is how many stored messages the hub keeps for replays.
func (h *Hub) recentCap() int { return max(h.history, h.replayMax) }

// Run is the hub goroutine. It returns after Shutdown.
func (h *Hub) Run() {
	defer close(h.done)
	var ping <-chan time.Time
	if h.pingInterval > 0 {
		t := time.NewTicker(h.pingInterval)
		defer t.Stop()
		ping = t.C
	}
	for {
		select {
		case f := <-h.work:
			f()
		case now := <-ping:
			h.dropSilent(now)
			h.broadcast(pingFrame, nil)
			h.releaseMemoryAfterDrop()
		case code := <-h.quit:
			h.announceShutdown()
			h.flush()
			h.closeAll(code)
			h.waitForLeaves()
			return
		}
		h.drain()
		h.flush()
	}
}

// drain does the work already waiting, up to a bound that keeps the first
// of it from waiting long for its flush. Doing it all before flushing is
// what lets a busy hub send many frames per system call: a burst of
// messages or joins reaches each client in one write. The bound counts
// deliveries too, so that a storm of events in a full room (ten thousand
// leaving at once) does not pile up in every queue at once.
func (h *Hub) drain() {
	for range maxBatch {
		if h.queuedSinceFlush >= flushBudget {
			return
		}
		select {
		case f := <-h.work:
			f()
		default:
			return
		}
	}
}

func (h *Hub) handleReserve(c *client) reserveResult {
	key := strings.ToLower(c.user)
	if h.clients[key] != nil {
		return reserveTaken
	}
	if h.closing || len(h.clients) >= h.maxConns {
		return reserveFull
	}
	h.clients[key] = c
	h.peak = max(h.peak, len(h.clients))
	return reserved
}

// handleActivate starts delivery to c: first its replay, then, like every
// other active client, whatever the hub handles next.
func (h *Hub) handleActivate(c *client, since int64) {
	if h.clients[strings.ToLower(c.user)] != c {
		return // removed (logout, shutdown) between reserve and activate
	}
	h.replay(c, since)
	h.broadcast(eventFrame("join", c.user), c)
	c.active = true
}

func (h *Hub) replay(c *client, since int64) {
	var msgs []Message
	if since < 0 {
		msgs = h.recent[max(0, len(h.recent)-h.history):]
	} else {
		i := sort.Search(len(h.recent), func(i int) bool { return h.recent[i].ID > since })
		msgs = h.recent[i:]
		if len(msgs) > h.replayMax {
			msgs = msgs[len(msgs)-h.replayMax:]
		}
		if h.missed(since, msgs) {
			h.deliver(c, gapFrame)
		}
	}
	for _, m := range msgs {
		h.deliver(c, h.historyFrame(m))
	}
}

// missed reports whether messages after since exist, or existed, that a
// replay of msgs leaves out. Ids are handed out without holes, so any id
// between since and the first replayed one was deleted or cut off.
func (h *Hub) missed(since int64, msgs []Message) bool {
	if len(msgs) == 0 {
		return since < h.lastID
	}
	return msgs[0].ID > since+1
}

func (h *Hub) historyFrame(m Message) []byte {
	if f, ok := h.frames[m.ID]; ok {
		return f
	}
	f := messageFrame(m, true)
	h.frames[m.ID] = f
	return f
}

func (h *Hub) handlePublished(m Message, from *client) {
	h.recent = append(h.recent, m)
	h.lastID = max(h.lastID, m.ID)
	h.trimRecent()
	h.broadcast(messageFrame(m, false), from)
	if from.active {
		h.deliver(from, ackFrame(m.ID))
	}
}

// trimRecent keeps at least the newest recentCap messages. It lets the
// slice grow to twice that before copying, so appends stay amortised O(1).
func (h *Hub) trimRecent() {
	if limit := h.recentCap(); len(h.recent) > 2*limit {
		h.dropOldest(len(h.recent) - limit)
	}
}

// forgetThrough drops recent messages with id <= id, after retention
// deleted them from the database.
func (h *Hub) forgetThrough(id int64) {
	h.dropOldest(sort.Search(len(h.recent), func(i int) bool { return h.recent[i].ID > id }))
}

func (h *Hub) dropOldest(n int) {
	for _, m := range h.recent[:n] {
		delete(h.frames, m.ID)
	}
	h.recent = slices.Clone(h.recent[n:])
}

// broadcast queues frame for every active client but except. A client whose
// queue is full is dropped after the loop, so that its leave event comes
// after this frame for everyone.
func (h *Hub) broadcast(frame []byte, except *client) {
	var slow []*client
	for _, c := range h.clients {
		if c == except || !c.active {
			continue
		}
		if !c.enqueue(frame) {
			slow = append(slow, c)
			continue
		}
		h.markDirty(c)
	}
	for _, c := range slow {
		h.log.Warn("dropping slow websocket client", "user", c.user)
		h.remove(c, closePolicyViolation)
	}
}

// releaseMemoryAfterDrop hands memory back to the system once most of a
// large crowd has left. Go keeps freed heap for reuse and returns it slowly,
// and nothing allocates to prompt it when the room has gone quiet; on a
// small VPS, the memory of yesterday's peak is better given back.
func (h *Hub) releaseMemoryAfterDrop() {
	if h.peak >= releaseAfterPeak && len(h.clients) < h.peak/4 {
		go debug.FreeOSMemory()
		h.peak = len(h.clients)
	}
}

// releaseAfterPeak is the crowd below which a drop is not worth a GC.
const releaseAfterPeak = 1000

// dropSilent drops the clients that have sent nothing, not even a pong,
// for two ping intervals: their peer is gone without a word (a half-open
// connection) or has stopped reading.
func (h *Hub) dropSilent(now time.Time) {
	var silent []*client
	for _, c := range h.clients {
		if c.active && c.silentFor(now) > 2*h.pingInterval {
			silent = append(silent, c)
		}
	}
	for _, c := range silent {
		h.log.Info("dropping silent websocket client", "user", c.user)
		h.remove(c, closePolicyViolation)
	}
}

// deliver queues frame for one client, dropping it when its queue is full.
func (h *Hub) deliver(c *client, frame []byte) {
	if !c.enqueue(frame) {
		h.remove(c, closePolicyViolation)
		return
	}
	h.markDirty(c)
}

// flushBudget is how many deliveries the hub queues before it flushes.
const flushBudget = 1 << 18

func (h *Hub) markDirty(c *client) {
	h.queuedSinceFlush++
	if !c.dirty {
		c.dirty = true
		h.dirty = append(h.dirty, c)
	}
}

// flush writes, for each client that got frames since the last flush, all
// of them at once.
func (h *Hub) flush() {
	for _, c := range h.dirty {
		c.dirty = false
		h.scratch = c.flush(h.scratch)
	}
	clear(h.dirty)
	h.dirty = h.dirty[:0]
	h.queuedSinceFlush = 0
}

// remove takes c out of the set, tells the others it left and, when code is
// not 0, closes its socket with that code.
func (h *Hub) remove(c *client, code int) {
	key := strings.ToLower(c.user)
	if h.clients[key] != c {
		return
	}
	delete(h.clients, key)
	if code != 0 {
		c.close(code)
	}
	if c.active && !h.closing { // at shutdown, announceShutdown told everyone
		h.broadcast(eventFrame("leave", c.user), nil)
	}
	c.active = false
}

// announceShutdown tells every client that the others are leaving, before
// their close frames. In a crowd that is a frame for every pair, so beyond
// shutdownLeaveLimit clients the close frame alone says it.
func (h *Hub) announceShutdown() {
	if len(h.clients) > shutdownLeaveLimit {
		return
	}
	for _, c := range h.clients {
		if c.active {
			h.broadcast(eventFrame("leave", c.user), c)
		}
	}
}

const shutdownLeaveLimit = 1000

func (h *Hub) closeAll(code int) {
	h.closing = true
	for _, c := range h.clients {
		c.close(code)
	}
}

// waitForLeaves keeps doing the hub's work until every client has gone, so
// the readers of closed sockets can finish.
func (h *Hub) waitForLeaves() {
	for len(h.clients) > 0 {
		(<-h.work)()
	}
}

// call runs f on the hub goroutine and waits for it. It reports false when
// the hub has stopped.
func (h *Hub) call(f func()) bool {
	done := make(chan struct{})
	select {
	case h.work <- func() { f(); close(done) }:
	case <-h.done:
		return false
	}
	select {
	case <-done:
		return true
	case <-h.done: // stopped with f still queued
		return false
	}
}

// Reserve claims the single socket slot of c.user.
func (h *Hub) Reserve(c *client) reserveResult {
	result := reserveFull
	h.call(func() { result = h.handleReserve(c) })
	return result
}

// Activate starts delivering to a reserved client whose socket is open.
func (h *Hub) Activate(c *client, since int64) {
	h.call(func() { h.handleActivate(c, since) })
}

// Leave removes c and returns once the others have been told. Closing the
// socket is the caller's business.
func (h *Hub) Leave(c *client) {
	h.call(func() { h.remove(c, 0) })
}

// Publish hands a committed message to the hub for delivery, without
// waiting for it to be delivered.
func (h *Hub) Publish(m Message, from *client) {
	select {
	case h.work <- func() { h.handlePublished(m, from) }:
	case <-h.done:
	}
}

// Online returns the names of users with an open socket, sorted.
func (h *Hub) Online() []string {
	names := []string{}
	h.call(func() {
		for _, c := range h.clients {
			if c.active {
				names = append(names, c.user)
			}
		}
	})
	sort.Strings(names)
	return names
}

// IsOnline reports whether user has an open socket.
func (h *Hub) IsOnline(user string) bool {
	online := false
	h.call(func() {
		c := h.clients[strings.ToLower(user)]
		online = c != nil && c.active
	})
	return online
}

// Logout closes the socket opened with session id, if any.
func (h *Hub) Logout(user, session string) {
	h.call(func() {
		if c := h.clients[strings.ToLower(user)]; c != nil && c.session == session {
			h.remove(c, closeNormal)
		}
	})
}

// Forget drops replayable messages with id <= id (deleted by retention).
func (h *Hub) Forget(id int64) {
	h.call(func() { h.forgetThrough(id) })
}

// Shutdown closes every socket with code and returns when their readers
// have left, or when ctx is done. Later calls do nothing.
func (h *Hub) Shutdown(ctx context.Context, code int) {
	select {
	case h.quit <- code:
	case <-h.done:
		return
	}
	select {
	case <-h.done:
	case <-ctx.Done():
	}
}

// Frames the hub sends. Each is encoded once, however many receive it.

type messageJSON struct {
	Message string `json:"message"`
	Author  string `json:"author"`
	ID      int64  `json:"id"`
	Time    string `json:"time"`
	History bool   `json:"history,omitempty"`
}

// timeFormat is RFC 3339 in UTC with a fixed millisecond width.
const timeFormat = "2006-01-02T15:04:05.000Z07:00"

func messageFrame(m Message, history bool) []byte {
	return textFrame(mustJSON(messageJSON{
		Message: m.Text, Author: m.Author, ID: m.ID,
		Time: m.Time.UTC().Format(timeFormat), History: history,
	}))
}

func eventFrame(event, user string) []byte {
	return textFrame(mustJSON(struct {
		Event    string `json:"event"`
		Username string `json:"username"`
	}{event, user}))
}

func ackFrame(id int64) []byte {
	return textFrame(mustJSON(struct {
		Status bool  `json:"status"`
		ID     int64 `json:"id"`
	}{true, id}))
}

func errorAckFrame(code string) []byte {
	return textFrame(mustJSON(struct {
		Status bool   `json:"status"`
		Code   string `json:"code"`
	}{false, code}))
}

var (
	gapFrame  = textFrame([]byte(`{"event":"gap"}`))
	pingFrame = wsFrame(opPing, nil)

	ackTooLong      = errorAckFrame("message_too_long")
	ackInvalid      = errorAckFrame("invalid_message")
	ackRateLimited  = errorAckFrame("rate_limited")
	ackStorageError = errorAckFrame("storage_error")
)

// mustJSON encodes values whose types cannot fail to encode.
func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}
