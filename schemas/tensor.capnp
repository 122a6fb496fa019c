@0xf10c1a066822f431;
# Pangea wire format: the single source of truth for every message on the bus.
#
# Every top-level message starts with a Header whose `kind` names the struct, so a
# valid message of the wrong type is refused instead of being misread.  Big vectors
# (gradients, parameters) travel as Chunks: slices of the model's flat float vector,
# each a self-contained message that fits the server's max payload.

const schemaVersion :UInt16 = 1;

enum Kind {
  unknown @0;
  batch @1;
  gradient @2;
  params @3;
  roundPlan @4;
  heartbeat @5;
  jobSpec @6;
  roundDone @7;
}

struct Header {
  schemaVersion @0 :UInt16;
  kind @1 :Kind;
  job @2 :Text;
  sender @3 :Text;        # worker id, "orchestrator" or "preprocessor"
}

enum DType {
  float32 @0;
  float16 @1;
  bfloat16 @2;
  float64 @3;
  int64 @4;
  int32 @5;
  int16 @6;
  int8 @7;
  uint8 @8;
  bool @9;
  uint32 @10;
}

struct Tensor {
  dtype @0 :DType;
  shape @1 :List(UInt64);
  data @2 :Data;          # little-endian, C order, exactly prod(shape) * itemsize bytes
  name @3 :Text;
}

# A slice [offset, offset + values.len) of a flat vector of `total` elements.
struct Chunk {
  index @0 :UInt32;
  count @1 :UInt32;
  offset @2 :UInt64;
  total @3 :UInt64;
}

# One worker's share of global batch `round`: rows [start, stop) of that global batch.
struct Batch {
  header @0 :Header;
  round @1 :UInt64;
  epoch @2 :UInt32;
  step @3 :UInt32;        # index of the global batch within its epoch
  worker @4 :Text;
  shard @5 :UInt32;       # index of this shard in the round plan
  start @6 :UInt32;
  stop @7 :UInt32;
  x @8 :Tensor;
  y @9 :Tensor;
  generation @10 :UInt32;  # of the orchestrator that planned it (see RoundPlan)
  inner @11 :UInt32;      # diloco: which of the round's local steps this batch is for
  innerSteps @12 :UInt32; # diloco: local steps in the round (0 or 1: one step, as in sync)
  # Named tensors beyond x and y, e.g. an attention mask or a loss mask; each Tensor's `name`
  # is its key (not empty, not "x" or "y", no two alike).
  extra @13 :List(Tensor);
}

# A worker's gradient of the loss on one shard, one chunk at a time.
struct Gradient {
  header @0 :Header;
  round @1 :UInt64;
  shard @2 :UInt32;
  numSamples @3 :UInt32;
  loss @4 :Float64;       # mean loss over the shard's counted targets
  paramsVersion @5 :UInt64;
  chunk @6 :Chunk;
  values @7 :Tensor;
  generation @8 :UInt32;  # of the parameters it was computed on
  compression @9 :Text;   # none | fp16 | bf16 | int8 | topk: how `values` encodes the chunk
  scale @10 :Float64;     # int8: value = q * scale
  indices @11 :Tensor;    # topk: uint32 positions of `values` within the chunk
  # The number of counted targets behind `values`.  sync and async: `values` is the gradient
  # of the loss SUMMED over these targets, and the orchestrator divides the sum over shards
  # by the sum of counts.  diloco, and compressed gradients: `values` is the shard's mean over
  # them, weighted by the count.  -1 (the default): a writer older than counts, refused.
  count @12 :Float64 = -1;
}

# Parameters after `version` optimizer steps, one chunk at a time.
struct Params {
  header @0 :Header;
  version @1 :UInt64;
  final @2 :Bool;         # the job is over after this version
  layoutHash @3 :Text;
  chunk @4 :Chunk;
  values @5 :Tensor;
  generation @6 :UInt32;  # (generation, version) orders parameters across orchestrator restarts
}

struct Shard {
  worker @0 :Text;
  start @1 :UInt32;
  stop @2 :UInt32;
}

# Who computes what in round `round`: global batch `step` of `epoch`, split into shards.
struct RoundPlan {
  header @0 :Header;
  round @1 :UInt64;
  epoch @2 :UInt32;
  step @3 :UInt32;
  batchSize @4 :UInt32;   # rows of this global batch (the last batch of an epoch may be short)
  shards @5 :List(Shard);
  final @6 :Bool;         # no more rounds: the preprocessor may stop
  attempt @7 :UInt32;     # 0 for the first plan of a round, +1 for every re-issue
  reissue @8 :List(UInt32);  # attempt > 0: the shards to publish again (to their new worker)
  generation @9 :UInt32;  # +1 each time an orchestrator (re)starts the job: later plans win
  innerSteps @10 :UInt32; # diloco: the round covers this many global batches from (epoch, step)
  # Published one round early, while the round before is still being reduced, so that the
  # workers hold their batches when the parameters arrive: only the preprocessor acts on it.
  # The round opens with the same plan again (ahead = false; its batches are not re-published).
  ahead @11 :Bool;
}

struct Heartbeat {
  header @0 :Header;
  worker @1 :Text;
  host @2 :Text;
  pid @3 :UInt32;
  sentAt @4 :Float64;     # unix seconds
  shardsDone @5 :UInt64;
  paramsVersion @6 :UInt64;
  bytesSent @7 :UInt64;   # gradient bytes this worker published so far
  # The kernels its gradients come from (float results depend on them): see pangea/kernels.py.
  torchVersion @8 :Text;
  torchThreads @9 :UInt32;
  device @10 :Text;
  cpu @11 :Text;
  ready @12 :Bool;               # its batch consumer exists and it holds a parameter version
  heartbeatSeconds @13 :Float64; # its heartbeat period: late by a few of these means overdue
}

# What a worker needs to join the job: stored in the job's KV bucket.
struct JobSpec {
  header @0 :Header;
  model @1 :Text;
  hidden @2 :List(UInt32);
  inputShape @3 :List(UInt64);
  numClasses @4 :UInt32;
  numParams @5 :UInt64;
  layoutHash @6 :Text;
  totalRounds @7 :UInt64;
  seed @8 :UInt64;
  dataset @9 :Text;
  batchSize @10 :UInt32;
  epochs @11 :UInt32;
  optimizer @12 :Text;    # sgd | adam | adamw | module:factory | pickle:<sha256>
  lr @13 :Float64;
  momentum @14 :Float64;
  weightDecay @15 :Float64;
  sourceJob @16 :Text;    # a replay: the job whose stored batches it trains on
  compression @17 :Text;  # how workers compress gradients
  topkFraction @18 :Float64;
  shards @19 :UInt16;     # orchestrator shards: each reduces one slice of the gradient (0 or 1: none)
  mode @20 :Text;         # sync | diloco | async
  localSteps @21 :UInt32; # diloco: inner steps per round (H)
  innerOptimizer @22 :Text;
  innerLr @23 :Float64;
  staleness @24 :UInt32;  # async: the staleness bound s
  task @25 :Text;         # classify | lm | module:function (the loss workers compute)
  context @26 :UInt32;    # lm: tokens per window
  vocab @27 :UInt32;      # lm: vocabulary size
  valFraction @28 :Float64;  # lm: the validation split of the token file
  layers @29 :UInt32;     # gpt: blocks, heads, width
  heads @30 :UInt32;
  dim @31 :UInt32;
  lrSchedule @32 :Text;   # constant | cosine: the server optimizer's rate over the run
  warmupSteps @33 :UInt32;
  clipGrad @34 :Float64;  # global norm the mean gradient is clipped to (0: off)
  maxSteps @35 :UInt64;   # global batches in the run when fewer than the epochs hold (0: all)
  outerLr @36 :Float64;   # diloco's outer optimizer
  outerMomentum @37 :Float64;
  evalEvery @38 :UInt32;
  evalWindows @39 :UInt32;
  aggregator @40 :Text;   # how the orchestrator combined shards, and how strictly
  byzantine @41 :UInt32;
  clipNorm @42 :Float64;
  policy @43 :Text;
  step @44 :Text;         # the step hook: module:function | pickle:<sha256> ("": the task's built-in step)
  microBatch @45 :UInt32; # rows per piece of a shard's gradient accumulation (0: the whole shard)
  precision @46 :Text;    # fp32 | bf16 (autocast)
  # Elements of the flat vector that are trainable parameters; the rest are buffers
  # (0 from an older writer: all of numParams).
  paramNumel @47 :UInt64;
  # Where samples come from, beyond `dataset` (README "Your own data"): the preprocessor's.
  transform @48 :Text;    # per-sample transform(sample, rng), module:function or pickle:<sha256>
  collate @49 :Text;      # global-batch collate(samples, rng)
  valDataset @50 :Text;   # a separate evaluation source (token files: the validation stream)
  columns @51 :Text;      # NAME=column,...: a table's columns under the names steps read
  imageSize @52 :UInt32;  # imagefolder: the side of the square crops
  normalize @53 :Text;    # workers: "" or "m,m,m/s,s,s" for uint8 image bytes, after x / 255
  tokenDtype @54 :Text;   # headerless .bin token files: uint16 | uint32
}

# Published by the orchestrator after each optimizer step (progress, status).
struct RoundDone {
  header @0 :Header;
  round @1 :UInt64;
  totalRounds @2 :UInt64;
  epoch @3 :UInt32;
  loss @4 :Float64;
  seconds @5 :Float64;
  numSamples @6 :UInt32;
  testAccuracy @7 :Float64;   # NaN when not evaluated this round
  workers @8 :List(Text);
  recentSeconds @9 :List(Float64);  # durations of the last rounds, newest last
  # Members not planned into new rounds, and why (overdue, quarantined, starting).
  excludedWorkers @10 :List(Text);
  excludedReasons @11 :List(Text);
  figure @12 :Text;              # what testAccuracy holds: the task's headline figure (val_loss for lm)
  targetsPerSample @13 :UInt32;  # lm: tokens per window (tokens/s = samples/s x this)
}
