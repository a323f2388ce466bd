// TensorRT IPluginV3 wrapper around the fused temporal-attention kernel (mirage_kernels.h).
//
// The ONNX exporter (export/onnx_export.py) writes one node per temporal layer:
//   op_type MirageTemporalAttention, domain mirage, attributes heads / plugin_version / plugin_namespace
// and the TensorRT ONNX parser maps it to the creator registered here under (name, version, namespace)
// = ("MirageTemporalAttention", "1", "mirage") -- keep these equal to runtime/graphs.py.
//
// Inputs (all linear, contiguous):
//   0 q (B, N, D)   1 k_self (B, N, D)   2 v_self (B, N, D)
//   3 memory (B, K, 2, N, D): this layer's slice of the ring buffer (so total_tokens = N, token_offset = 0)
//   4 ages (B, K) int32, 0 = empty slot   5 age_table (K + 1, D)
// Output 0: out (B, N, D). Inputs 0-3, 5 and the output share one type: float, half or bfloat16.
//
// The library is loaded with IPluginRegistry::loadLibrary / trt.get_plugin_registry().load_library
// (or trtexec --dynamicPlugins), which looks up the two extern "C" entry points at the bottom. It only
// needs TensorRT's headers: every TensorRT object it touches is reached through virtual interfaces.
#include <NvInfer.h>
#include <NvInferRuntime.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "mirage_kernels.h"

using namespace nvinfer1;

namespace {

constexpr char const* kPluginName = "MirageTemporalAttention";  // runtime/graphs.py PLUGIN_NAME
constexpr char const* kPluginVersion = "1";                      // PLUGIN_VERSION
constexpr char const* kPluginNamespace = "mirage";               // PLUGIN_NAMESPACE
constexpr char const* kHeadsField = "heads";
constexpr int32_t kNbInputs = 6;
constexpr int32_t kNbOutputs = 1;
enum Io : int32_t { kQ = 0, kKSelf, kVSelf, kMemory, kAges, kAgeTable, kOut };

// ---- logging: TensorRT hands us its logger through setLoggerFinder(); stderr until it does ----

class LoggerFinder {
 public:
  void set(ILoggerFinder* finder) {
    std::lock_guard<std::mutex> lock(mMutex);
    if (mFinder == nullptr) mFinder = finder;  // keep the first, as TensorRT's own plugin libraries do
  }
  void log(ILogger::Severity severity, std::string const& msg) {
    std::string const line = std::string(kPluginName) + ": " + msg;
    ILogger* logger = nullptr;
    {
      std::lock_guard<std::mutex> lock(mMutex);
      if (mFinder != nullptr) logger = mFinder->findLogger();
    }
    if (logger != nullptr)
      logger->log(severity, line.c_str());
    else if (severity <= ILogger::Severity::kWARNING)
      std::fprintf(stderr, "[mirage_plugin] %s\n", line.c_str());
  }

 private:
  std::mutex mMutex;
  ILoggerFinder* mFinder{nullptr};
};

LoggerFinder gLogger;

void logError(std::string const& msg) { gLogger.log(ILogger::Severity::kERROR, msg); }

std::string dimsToString(Dims const& d) {
  std::string s = "(";
  for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + ")";
}

bool isFloatType(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }

bool toKernelType(DataType t, MirageDType& out) {
  switch (t) {
    case DataType::kFLOAT: out = MIRAGE_FP32; return true;
    case DataType::kHALF: out = MIRAGE_FP16; return true;
    case DataType::kBF16: out = MIRAGE_BF16; return true;
    default: return false;
  }
}

// The problem size read off the input shapes; all extents fit the kernel's int arguments once checked.
struct Shape {
  int32_t batch{}, tokens{}, dim{}, context{};
};

// Checks the six input shapes against each other and against what the kernel supports (see
// mirage_kernels.h). Extents of -1 (unknown at build time, e.g. a dynamic batch) match anything.
// On failure returns false with a message in `why`.
bool checkShapes(Dims const* in, int32_t heads, Shape& shape, std::string& why) {
  Dims const& q = in[kQ];
  if (q.nbDims != 3 || in[kKSelf].nbDims != 3 || in[kVSelf].nbDims != 3 || in[kMemory].nbDims != 5 ||
      in[kAges].nbDims != 2 || in[kAgeTable].nbDims != 2) {
    why = "expected ranks q/k_self/v_self 3, memory 5, ages 2, age_table 2; got q " + dimsToString(q) +
          ", memory " + dimsToString(in[kMemory]) + ", ages " + dimsToString(in[kAges]) + ", age_table " +
          dimsToString(in[kAgeTable]);
    return false;
  }
  auto same = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; };
  Dims const& mem = in[kMemory];
  Dims const& ages = in[kAges];
  Dims const& table = in[kAgeTable];
  int64_t const b = q.d[0], n = q.d[1], d = q.d[2], k = mem.d[1];
  bool ok = true;
  for (int32_t i : {kKSelf, kVSelf})
    for (int32_t j = 0; j < 3; ++j) ok = ok && same(in[i].d[j], q.d[j]);
  ok = ok && same(mem.d[0], b) && same(mem.d[2], 2) && same(mem.d[3], n) && same(mem.d[4], d);
  ok = ok && same(ages.d[0], b) && same(ages.d[1], k);
  ok = ok && same(table.d[0], k < 0 ? -1 : k + 1) && same(table.d[1], d);
  if (!ok) {
    why = "inconsistent shapes: want q/k_self/v_self (B, N, D), memory (B, K, 2, N, D), ages (B, K), "
          "age_table (K + 1, D); got q " + dimsToString(q) + ", k_self " + dimsToString(in[kKSelf]) + ", v_self " +
          dimsToString(in[kVSelf]) + ", memory " + dimsToString(mem) + ", ages " + dimsToString(ages) +
          ", age_table " + dimsToString(table);
    return false;
  }
  if (d >= 0) {
    int64_t const headDim = d % heads == 0 ? d / heads : 0;
    if (headDim == 0 || d > 1024 || d % 32 != 0 || (headDim & (headDim - 1)) != 0 || headDim < 2) {
      why = "channels D = " + std::to_string(d) + " with heads = " + std::to_string(heads) +
            ": need D % heads == 0, D a multiple of 32 up to 1024 and D / heads a power of two >= 2";
      return false;
    }
  }
  if (k >= 0 && (k < 1 || k > MIRAGE_MAX_CONTEXT)) {
    why = "context slots K = " + std::to_string(k) + " outside [1, " + std::to_string(MIRAGE_MAX_CONTEXT) + "]";
    return false;
  }
  // The kernel indexes pixels (B * N) and elements with int / size_t: keep B * N and every extent in int range.
  int64_t const kIntMax = std::numeric_limits<int32_t>::max();
  if (b > kIntMax || n > kIntMax || (b > 0 && n > 0 && b * n > kIntMax)) {
    why = "B * N = " + std::to_string(b) + " * " + std::to_string(n) + " exceeds the kernel's int range";
    return false;
  }
  shape = Shape{static_cast<int32_t>(b), static_cast<int32_t>(n), static_cast<int32_t>(d), static_cast<int32_t>(k)};
  return true;
}

// ---- the plugin ----

class TemporalAttentionPlugin final : public IPluginV3,
                                      public IPluginV3OneCore,
                                      public IPluginV3OneBuild,
                                      public IPluginV3OneRuntime {
 public:
  explicit TemporalAttentionPlugin(int32_t heads) : mHeads(heads) {}
  TemporalAttentionPlugin(TemporalAttentionPlugin const& other) : mHeads(other.mHeads), mShape(other.mShape) {}
  TemporalAttentionPlugin& operator=(TemporalAttentionPlugin const&) = delete;
  ~TemporalAttentionPlugin() override = default;

  // IPluginV3: TensorRT reaches each capability through this instead of dynamic_cast across libraries.
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }

  IPluginV3* clone() noexcept override {
    try {
      return new TemporalAttentionPlugin(*this);
    } catch (std::exception const& e) {  // interfaces are noexcept: nothing may escape into TensorRT
      logError(std::string("clone failed: ") + e.what());
      return nullptr;
    }
  }

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return kNbOutputs; }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || !isFloatType(inputTypes[kQ])) {
      logError("getOutputDataTypes: expected 6 inputs with q of type float, half or bfloat16, and 1 output");
      return -1;
    }
    outputTypes[0] = inputTypes[kQ];
    return 0;
  }

  // out has q's shape; copying q's expressions keeps a dynamic batch symbolic.
  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                          int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                          IExprBuilder& /*exprBuilder*/) noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[kQ].nbDims != 3) {
      logError("getOutputShapes: expected 6 inputs, q of rank 3 and 1 output");
      return -1;
    }
    outputs[0] = inputs[kQ];
    return 0;
  }

  // Everything linear; ages int32 (what the kernel reads); the rest share q's float type.
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs) return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    if (pos == kAges) return desc.type == DataType::kINT32;
    if (pos == kQ) return isFloatType(desc.type);
    return desc.type == inOut[kQ].desc.type;
  }

  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
      logError("configurePlugin: expected 6 inputs and 1 output");
      return -1;
    }
    try {  // build time: dims may hold -1 for extents that vary with the optimization profile
      Dims dims[kNbInputs];
      for (int32_t i = 0; i < kNbInputs; ++i) dims[i] = in[i].desc.dims;
      Shape shape;
      std::string why;
      if (!checkShapes(dims, mHeads, shape, why)) {
        logError("configurePlugin: " + why);
        return -1;
      }
      (void)out;
      return 0;
    } catch (std::exception const& e) {
      logError(std::string("configurePlugin: ") + e.what());
      return -1;
    }
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
                          DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override {
    return 0;  // the kernel reads the ring buffer in place and needs no scratch memory
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
      logError("onShapeChange: expected 6 inputs and 1 output");
      return -1;
    }
    try {
      Dims dims[kNbInputs];
      for (int32_t i = 0; i < kNbInputs; ++i) dims[i] = in[i].dims;
      Shape shape;
      std::string why;
      if (!checkShapes(dims, mHeads, shape, why)) {
        logError("onShapeChange: " + why);
        return -1;
      }
      if (shape.batch < 0 || shape.tokens < 0 || shape.dim < 0 || shape.context < 0) {
        logError("onShapeChange: unresolved extents in q " + dimsToString(in[kQ].dims) + " / memory " +
                 dimsToString(in[kMemory].dims));
        return -1;
      }
      if (out[0].dims.nbDims != 3 || out[0].dims.d[0] != shape.batch || out[0].dims.d[1] != shape.tokens ||
          out[0].dims.d[2] != shape.dim) {
        logError("onShapeChange: output " + dimsToString(out[0].dims) + " differs from q " +
                 dimsToString(in[kQ].dims));
        return -1;
      }
      mShape = shape;
      return 0;
    } catch (std::exception const& e) {
      logError(std::string("onShapeChange: ") + e.what());
      return -1;
    }
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                  void const* const* inputs, void* const* outputs, void* /*workspace*/,
                  cudaStream_t stream) noexcept override {
    MirageDType dtype;
    if (!toKernelType(inputDesc[kQ].type, dtype)) {
      logError("enqueue: unsupported data type for q");
      return -1;
    }
    if (mShape.batch == 0 || mShape.tokens == 0) return 0;  // empty batch: nothing to write
    // memory is this layer's own (B, K, 2, N, D) slice, so the kernel sees total_tokens = N, offset 0.
    cudaError_t const status = mirage_temporal_attention(
        dtype, inputs[kQ], inputs[kKSelf], inputs[kVSelf], inputs[kMemory], static_cast<int32_t const*>(inputs[kAges]),
        inputs[kAgeTable], outputs[0], mShape.batch, mShape.tokens, mShape.dim, mShape.context, mHeads,
        /*total_tokens=*/mShape.tokens, /*token_offset=*/0, stream);
    if (status != cudaSuccess) {
      logError(std::string("enqueue: mirage_temporal_attention failed: ") + cudaGetErrorName(status) + " (" +
               cudaGetErrorString(status) + ") for B=" + std::to_string(mShape.batch) +
               " N=" + std::to_string(mShape.tokens) + " D=" + std::to_string(mShape.dim) +
               " K=" + std::to_string(mShape.context) + " heads=" + std::to_string(mHeads));
      return -1;
    }
    return 0;
  }

  // No per-context resources: each execution context gets its own copy (onShapeChange writes mShape).
  IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override { return clone(); }

  // What the engine stores; handed back to the creator's createPlugin(..., kRUNTIME) on deserialization.
  PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    mFields[0] = PluginField(kHeadsField, &mHeads, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = 1;
    mFieldCollection.fields = mFields;
    return &mFieldCollection;
  }

 private:
  int32_t mHeads;
  Shape mShape{};  // set by onShapeChange; read by enqueue
  PluginField mFields[1];
  PluginFieldCollection mFieldCollection{};
};

// ---- the creator ----

class TemporalAttentionCreator final : public IPluginCreatorV3One {
 public:
  TemporalAttentionCreator() {
    mFieldNames[0] = PluginField(kHeadsField, nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = 1;
    mFieldCollection.fields = mFieldNames;
  }

  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }

  // Build phase: fields come from the ONNX node (parsers pass INT attributes as kINT32 or kINT64, and
  // may add plugin_version / plugin_namespace, which are ignored). Runtime phase: getFieldsToSerialize().
  IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept override {
    try {
      std::string const layer = name ? name : "";
      int64_t heads = 0;
      bool found = false, readable = false;
      for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        if (f.name == nullptr || std::string(f.name) != kHeadsField) continue;
        found = true;
        if (f.data == nullptr || f.length != 1) break;
        readable = true;
        if (f.type == PluginFieldType::kINT32)
          heads = *static_cast<int32_t const*>(f.data);
        else if (f.type == PluginFieldType::kINT64)
          heads = *static_cast<int64_t const*>(f.data);
        else
          readable = false;
      }
      if (!found) {
        logError("layer '" + layer + "': missing required field 'heads' (an INT attribute of the ONNX node)");
        return nullptr;
      }
      if (!readable || heads < 1 || heads > 512) {  // D <= 1024 and D / heads >= 2 give heads <= 512
        logError("layer '" + layer + "': field 'heads' must be one int32 or int64 value in [1, 512]; got " +
                 (readable ? std::to_string(heads) : std::string("a field of another type or length")));
        return nullptr;
      }
      return new TemporalAttentionPlugin(static_cast<int32_t>(heads));
    } catch (std::exception const& e) {
      logError(std::string("createPlugin: ") + e.what());
      return nullptr;
    }
  }

 private:
  PluginField mFieldNames[1];
  PluginFieldCollection mFieldCollection{};
};

}  // namespace

// ---- entry points of a plugin library (see TensorRT samples/trtexec/README.md, plugin/vc/vfcCommon.cpp) ----
// Only these two are exported (plugins_cpp/src/mirage_plugin.map); everything else, the kernel included, stays
// local so that the library can be loaded next to libmirage_kernels.so or embedded in an engine.

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder) {
  gLogger.set(finder);
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static TemporalAttentionCreator creator;
  static IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
