"""Backups of live exports: copy-before-write, point-in-time snapshot, pump, jobs.

Modules (design ancestor: QEMU block/copy-before-write.c, block/block-copy.c,
block/snapshot-access.c, block/backup.c, job.c):

- (`blockdev.live` -- `LiveDev`, every writable export's device, runs the write hooks this package attaches.)
- `copystate` -- `CopyState`: THE state shared by CBW, snapshot reads and the
  pump (done / pump_todo bitmaps, where each saved cluster lives: target,
  scratch, zero, trimmed; in-flight copies, snapshot readers).  The target
  receives exactly the sync set; CBW copies of other clusters go to the
  scratch (docs/scratch.md).
- `cbw`       -- `CBWHook`: copy-before-write, with on-cbw-error/cbw-timeout.
- `snapshot`  -- `SnapshotDev`: the read-only point-in-time view (fleecing);
  TRIM on it (``snapshot-trim``) releases what a client has read.
- `pump`      -- `Pump` (background copier) and `RateLimiter`.
- `job`       -- `BackupJob`: QEMU's job state machine, error policies, events.
- `engine`    -- `Engine`: validation, backup_start and the job verbs;
  `register_commands` for the QMP server.
- `bitmaps`   -- `RegistryBitmapSource`: dirty bitmaps for incremental backups.
- `testing`   -- `FaultDev`: fault/delay injection for tests.
"""
