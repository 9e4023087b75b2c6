// Command loadtest drives a running gochat server and reports what users
// feel and what the server pays: delivery latency, losses, and the server's
// CPU per delivery as a multiple of the machine's floor, the cost of one
// small write() to a loopback socket, measured in the same run.
//
// Start the server with its rate limits off, then point this at it:
//
//	go run . -addr 127.0.0.1:7777 -db /tmp/load.db -msg-rate 0 -auth-rate 0 -open-rate 0 &
//	go run ./loadtest -addr 127.0.0.1:7777 -pid $!
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/websocket"
)

type options struct {
	addr      string
	pid       int
	modes     string
	receivers int
	senders   int
	rate      float64
	jitter    float64
	window    int
	duration  time.Duration
	idle      int
	setup     int
	conc      int
}

func main() {
	var o options
	flag.StringVar(&o.addr, "addr", "127.0.0.1:7777", "server address")
	flag.IntVar(&o.pid, "pid", 0, "server process id, for its CPU time and RSS (0: not reported)")
	flag.StringVar(&o.modes, "mode", "floor,fanout,idle,setup", "comma-separated: floor, fanout, idle, setup")
	flag.IntVar(&o.receivers, "receivers", 200, "fan-out: receiving clients")
	flag.IntVar(&o.senders, "senders", 4, "fan-out: sending clients")
	flag.Float64Var(&o.rate, "rate", 50, "fan-out: messages per second per sender (0: as fast as acks allow)")
	flag.Float64Var(&o.jitter, "jitter", 0.5, "fan-out with -rate: each sender starts at a random phase and waits a random 1±jitter intervals between messages (0: all in step)")
	flag.IntVar(&o.window, "window", 1, "fan-out with -rate 0: unacknowledged messages per sender")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "fan-out: send window")
	flag.IntVar(&o.idle, "idle", 10000, "idle: connected clients that only listen")
	flag.IntVar(&o.setup, "setup", 2000, "setup: accounts registered, logged in and connected")
	flag.IntVar(&o.conc, "concurrency", 64, "setup and idle: parallel account set-ups")
	flag.Parse()
	raiseFileLimit()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "loadtest:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	floor := measureFloor()
	fmt.Printf("%-34s %10.2f µs per write (1 = floor)\n", "floor: 100-byte loopback write", floor.Seconds()*1e6)
	prefix := fmt.Sprintf("l%x", time.Now().UnixNano()&0xFFFFFF)
	failed := false
	for _, mode := range strings.Split(o.modes, ",") {
		var err error
		switch strings.TrimSpace(mode) {
		case "floor":
		case "fanout":
			var lost int64
			lost, err = fanout(o, prefix+"f", floor)
			failed = failed || lost > 0
		case "idle":
			err = idle(o, prefix+"i")
		case "setup":
			err = setup(o, prefix+"s")
		default:
			err = fmt.Errorf("unknown mode %q", mode)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", mode, err)
		}
	}
	if failed {
		return errors.New("messages were lost")
	}
	return nil
}

// --- floor ---

// measureFloor returns the CPU time one thread spends on a 100-byte write()
// to a loopback TCP socket that another goroutine drains.
func measureFloor() time.Duration {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			panic(err)
		}
		accepted <- c
	}()
	w, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		panic(err)
	}
	defer w.Close()
	r := <-accepted
	defer r.Close()
	go io.Copy(io.Discard, r)

	const n = 50000
	msg := bytes.Repeat([]byte("x"), 100)
	raw, _ := w.(*net.TCPConn).SyscallConn()
	best := time.Duration(1 << 62)
	for range 3 { // the quietest of three rounds: others only add noise
		var cpu time.Duration
		runtime.LockOSThread()
		raw.Write(func(fd uintptr) bool {
			start := threadCPU()
			for range n {
				for {
					_, err := syscall.Write(int(fd), msg)
					if err != syscall.EAGAIN && err != syscall.EINTR {
						break
					}
				}
			}
			cpu = threadCPU() - start
			return true
		})
		runtime.UnlockOSThread()
		best = min(best, cpu/n)
	}
	return best
}

func threadCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(1 /* RUSAGE_THREAD */, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// --- the server's side, from /proc ---

type procSample struct {
	cpu time.Duration
	rss int64 // bytes
}

func sampleProc(pid int) procSample {
	if pid == 0 {
		return procSample{}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procSample{}
	}
	// Fields after the command name, which is in parentheses.
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	rssPages, _ := strconv.ParseInt(fields[21], 10, 64)
	const ticks = 100 // USER_HZ on Linux
	return procSample{
		cpu: time.Duration(utime+stime) * time.Second / ticks,
		rss: rssPages * int64(os.Getpagesize()),
	}
}

// --- accounts ---

var httpClient = &http.Client{
	Timeout:   30 * time.Second,
	Transport: &http.Transport{MaxIdleConnsPerHost: 256},
}

func postJSON(url string, body any) (*http.Response, map[string]string, error) {
	b, _ := json.Marshal(body)
	resp, err := httpClient.Post(url, "application/json", bytes.NewReader(b))
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	var out map[string]string
	json.NewDecoder(resp.Body).Decode(&out)
	return resp, out, nil
}

// account registers name, logs in and opens a WebSocket.
func account(addr, name string) (*websocket.Conn, error) {
	base := "http://" + addr
	resp, out, err := postJSON(base+"/api/register", map[string]string{"username": name})
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusCreated {
		return nil, fmt.Errorf("register %s: %d %v", name, resp.StatusCode, out)
	}
	resp, out, err = postJSON(base+"/api/login", map[string]string{"key": out["key"]})
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("login %s: %d %v", name, resp.StatusCode, out)
	}
	var session string
	for _, c := range resp.Cookies() {
		if c.Name == "session" {
			session = c.Value
		}
	}
	cfg, err := websocket.NewConfig("ws://"+addr+"/ws", base)
	if err != nil {
		return nil, err
	}
	cfg.Header.Set("Cookie", "session="+session)
	return websocket.DialConfig(cfg)
}

// accounts sets up n accounts, conc at a time, calling got for each.
func accounts(o options, prefix string, n int, got func(i int, ws *websocket.Conn)) error {
	var next atomic.Int64
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	for range min(o.conc, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				ws, err := account(o.addr, fmt.Sprintf("%s%d", prefix, i))
				if err != nil {
					once.Do(func() { firstErr = err })
					return
				}
				got(i, ws)
			}
		}()
	}
	wg.Wait()
	return firstErr
}

// --- fan-out ---

type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d []time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d...)
	l.mu.Unlock()
}

// fanout runs receivers and senders and prints what happened. It returns
// how many deliveries were lost.
func fanout(o options, prefix string, floor time.Duration) (int64, error) {
	conns := make([]*websocket.Conn, o.receivers+o.senders)
	if err := accounts(o, prefix, len(conns), func(i int, ws *websocket.Conn) { conns[i] = ws }); err != nil {
		return 0, err
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	receivers, senders := conns[:o.receivers], conns[o.receivers:]

	var delivered atomic.Int64
	var lats latencies
	var rwg sync.WaitGroup
	for _, ws := range receivers {
		rwg.Add(1)
		go func() {
			defer rwg.Done()
			receive(ws, prefix, &delivered, &lats)
		}()
	}
	time.Sleep(500 * time.Millisecond) // let join events and history settle

	before := sampleProc(o.pid)
	start := time.Now()
	var sent atomic.Int64
	var swg sync.WaitGroup
	for i, ws := range senders {
		swg.Add(1)
		go func() {
			defer swg.Done()
			sent.Add(send(ws, fmt.Sprintf("%s-%d", prefix, i), o, start.Add(o.duration)))
		}()
	}
	swg.Wait()
	window := time.Since(start)
	after := sampleProc(o.pid)

	want := sent.Load() * int64(o.receivers)
	drainUntil := time.Now().Add(5 * time.Second)
	for delivered.Load() < want && time.Now().Before(drainUntil) {
		time.Sleep(20 * time.Millisecond)
	}
	for _, ws := range receivers {
		ws.Close()
	}
	rwg.Wait()

	got := delivered.Load()
	lost := want - got
	slices.Sort(lats.d)
	pct := func(p float64) time.Duration {
		if len(lats.d) == 0 {
			return 0
		}
		return lats.d[min(len(lats.d)-1, int(p*float64(len(lats.d))))]
	}
	rate := "max"
	if o.rate > 0 {
		rate = fmt.Sprintf("%g/s", o.rate)
	}
	fmt.Printf("fan-out: %d receivers, %d senders at %s each, %v\n", o.receivers, o.senders, rate, o.duration)
	fmt.Printf("  %-32s %10d\n", "messages sent (acked)", sent.Load())
	fmt.Printf("  %-32s %10d of %d\n", "deliveries", got, want)
	fmt.Printf("  %-32s %10d\n", "lost", lost)
	fmt.Printf("  %-32s %10.0f\n", "deliveries/s", float64(got)/window.Seconds())
	fmt.Printf("  %-32s %10v %v %v %v\n", "latency p50 p90 p99 max", pct(0.5).Round(10*time.Microsecond),
		pct(0.9).Round(10*time.Microsecond), pct(0.99).Round(10*time.Microsecond), pct(1).Round(10*time.Microsecond))
	if o.pid != 0 && got > 0 {
		perDelivery := (after.cpu - before.cpu) / time.Duration(got)
		fmt.Printf("  %-32s %10.2f µs = %.2f × floor\n", "server CPU per delivery", perDelivery.Seconds()*1e6,
			float64(perDelivery)/float64(floor))
		fmt.Printf("  %-32s %10.1f MiB\n", "server RSS", float64(after.rss)/(1<<20))
	}
	return lost, nil
}

// message is what the load tool sends: its send time rides in the text.
func messageText(tag string, seq int64) string {
	return fmt.Sprintf("%s %d %d", tag, seq, time.Now().UnixNano())
}

func sentAt(text string) (time.Time, bool) {
	i := strings.LastIndexByte(text, ' ')
	if i < 0 {
		return time.Time{}, false
	}
	ns, err := strconv.ParseInt(text[i+1:], 10, 64)
	return time.Unix(0, ns), err == nil
}

// send sends until deadline, paced by o.rate or by acks, and returns how
// many messages were acked.
func send(ws *websocket.Conn, tag string, o options, deadline time.Time) int64 {
	acks := make(chan struct{}, 1<<16)
	go func() {
		for {
			var frame struct {
				Status *bool `json:"status"`
			}
			if err := websocket.JSON.Receive(ws, &frame); err != nil {
				close(acks)
				return
			}
			if frame.Status != nil && *frame.Status {
				acks <- struct{}{}
			}
		}
	}()
	var sent, acked int64
	interval := time.Duration(float64(time.Second) / o.rate)
	next := time.Now()
	if o.rate > 0 && o.jitter > 0 {
		// Real users do not send in step: start at a random phase.
		next = next.Add(time.Duration(rand.Int64N(int64(interval))))
	}
	for time.Now().Before(deadline) {
		if o.rate > 0 {
			time.Sleep(time.Until(next))
			next = next.Add(time.Duration(float64(interval) * (1 + o.jitter*(2*rand.Float64()-1))))
		} else if sent-acked >= int64(o.window) {
			if _, ok := <-acks; !ok {
				return acked
			}
			acked++
			continue
		}
		if err := websocket.JSON.Send(ws, map[string]string{"message": messageText(tag, sent)}); err != nil {
			return acked
		}
		sent++
	}
	// Wait for the acks of what is in flight.
	timeout := time.After(5 * time.Second)
	for acked < sent {
		select {
		case _, ok := <-acks:
			if !ok {
				return acked
			}
			acked++
		case <-timeout:
			return acked
		}
	}
	return acked
}

// receive counts live messages from this run and their latency.
func receive(ws *websocket.Conn, prefix string, delivered *atomic.Int64, lats *latencies) {
	var local []time.Duration
	defer func() { lats.add(local) }()
	for {
		var frame struct {
			Message string `json:"message"`
			History bool   `json:"history"`
		}
		if err := websocket.JSON.Receive(ws, &frame); err != nil {
			return
		}
		if frame.History || !strings.HasPrefix(frame.Message, prefix) {
			continue
		}
		if at, ok := sentAt(frame.Message); ok {
			local = append(local, time.Since(at))
		}
		delivered.Add(1)
	}
}

// --- idle ---

func idle(o options, prefix string) error {
	runtime.GC()
	before := sampleProc(o.pid)
	conns := make([]*websocket.Conn, o.idle)
	var rwg sync.WaitGroup
	closeAll := func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
		rwg.Wait()
	}
	err := accounts(o, prefix, o.idle, func(i int, ws *websocket.Conn) {
		conns[i] = ws
		rwg.Add(1)
		go func() { // answer pings, discard the rest
			defer rwg.Done()
			var b []byte
			for websocket.Message.Receive(ws, &b) == nil {
			}
		}()
	})
	if err != nil {
		closeAll()
		return err
	}
	time.Sleep(3 * time.Second) // let the server settle after the burst
	held := sampleProc(o.pid)
	closeAll()
	time.Sleep(10 * time.Second)
	after := sampleProc(o.pid)
	time.Sleep(50 * time.Second)
	later := sampleProc(o.pid)
	fmt.Printf("idle: %d connected clients that only listen\n", o.idle)
	if o.pid != 0 {
		per := float64(held.rss-before.rss) / float64(o.idle)
		fmt.Printf("  %-32s %10.1f MiB -> %.1f MiB\n", "server RSS", float64(before.rss)/(1<<20), float64(held.rss)/(1<<20))
		fmt.Printf("  %-32s %10.1f KiB\n", "server RSS per connection", per/1024)
		fmt.Printf("  %-32s %10.1f MiB, after 60 s %.1f MiB\n", "server RSS 10 s after they left",
			float64(after.rss)/(1<<20), float64(later.rss)/(1<<20))
	}
	return nil
}

// --- setup ---

func setup(o options, prefix string) error {
	conns := make([]*websocket.Conn, o.setup)
	start := time.Now()
	err := accounts(o, prefix, o.setup, func(i int, ws *websocket.Conn) { conns[i] = ws })
	elapsed := time.Since(start)
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	if err != nil {
		return err
	}
	fmt.Printf("setup: %d accounts registered, logged in and connected, %d at a time\n", o.setup, o.conc)
	fmt.Printf("  %-32s %10.0f\n", "accounts per second", float64(o.setup)/elapsed.Seconds())
	return nil
}

func raiseFileLimit() {
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}
