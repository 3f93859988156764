package lab

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// LoadTable is the table the load writes into.
const LoadTable = "walship_load"

// Ack is one committed insert: the row's id and when the commit returned.
type Ack struct {
	ID int64
	At time.Time
}

// Load commits single-row inserts from several connections, as fast as they go, and
// logs every acknowledged id with the time its commit returned.
type Load struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	acks   []Ack
	err    error
}

// StartLoad creates the load table if needed and starts clients connections that each
// insert rows of rowBytes bytes of payload.
func StartLoad(ctx context.Context, dsn string, clients, rowBytes int) (*Load, error) {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, err
	}
	_, err = conn.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+LoadTable+" (id bigserial PRIMARY KEY, client int, payload text)")
	conn.Close(context.Background())
	if err != nil {
		return nil, fmt.Errorf("create load table: %w", err)
	}
	lctx, cancel := context.WithCancel(context.Background())
	l := &Load{cancel: cancel}
	payload := strings.Repeat("w", rowBytes)
	for i := 0; i < clients; i++ {
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			l.Stop()
			return nil, err
		}
		l.wg.Add(1)
		go func(client int, conn *pgx.Conn) {
			defer l.wg.Done()
			defer conn.Close(context.Background())
			for lctx.Err() == nil {
				var id int64
				err := conn.QueryRow(lctx, "INSERT INTO "+LoadTable+" (client, payload) VALUES ($1, $2) RETURNING id", client, payload).Scan(&id)
				at := time.Now()
				if err != nil {
					if lctx.Err() == nil {
						l.mu.Lock()
						if l.err == nil {
							l.err = err
						}
						l.mu.Unlock()
					}
					return
				}
				l.mu.Lock()
				l.acks = append(l.acks, Ack{ID: id, At: at})
				l.mu.Unlock()
			}
		}(i, conn)
	}
	return l, nil
}

// Acks returns a copy of the acknowledged inserts so far.
func (l *Load) Acks() []Ack {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Ack(nil), l.acks...)
}

// Count is how many inserts were acknowledged so far.
func (l *Load) Count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.acks)
}

// Stop ends the load and returns the first error a client met while it ran, if any
// (a client whose server died gets one).
func (l *Load) Stop() error {
	l.cancel()
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	if errors.Is(l.err, context.Canceled) {
		return nil
	}
	return l.err
}
