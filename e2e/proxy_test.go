package e2e

import (
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"
)

// startPrefixProxy serves the server at addr under prefix, as nginx with a
// location block would, WebSocket upgrades included. It returns its address.
func startPrefixProxy(t *testing.T, prefix, addr string) string {
	target := &url.URL{Scheme: "http", Host: addr}
	proxy := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
		r.SetURL(target)
		r.Out.URL.Path = "/" + strings.TrimPrefix(r.In.URL.Path, prefix)
		r.Out.Host = r.In.Host
		r.SetXForwarded()
	}}
	mux := http.NewServeMux()
	mux.Handle(prefix, proxy)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}
