module github.com/walship/walship

go 1.26.8

require (
	github.com/cespare/xxhash/v2 v2.3.0
	github.com/quic-go/quic-go v0.65.0
	github.com/rs/zerolog v1.35.1
)

require (
	github.com/mattn/go-colorable v0.1.14 // indirect
	github.com/mattn/go-isatty v0.0.20 // indirect
	golang.org/x/crypto v0.54.0 // indirect
	golang.org/x/net v0.56.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
