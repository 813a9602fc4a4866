// pybind11 binding of the integer entropy-model engine (csrc/int_mim.*): numpy arrays in,
// numpy arrays out, the GIL released while the engine runs. One Session per image and per
// thread: a Session used from two threads at once raises RuntimeError instead of racing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <memory>
#include <stdexcept>
#include <string>

#include "int_mim.hpp"

#ifndef PQMIM_SOURCE_FINGERPRINT
#define PQMIM_SOURCE_FINGERPRINT "unknown"
#endif

namespace py = pybind11;
using namespace pqmim::intmim;

namespace {

template <class T>
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <class T>
std::vector<T> vec(const py::dict& d, const std::string& name) {
  if (!d.contains(name.c_str())) throw std::invalid_argument("integer entropy model: missing " + name);
  Arr<T> a = d[name.c_str()].cast<Arr<T>>();
  return std::vector<T>(a.data(), a.data() + a.size());
}

int64_t scalar(const py::dict& d, const std::string& name) {
  std::vector<int64_t> v = vec<int64_t>(d, name);
  if (v.size() != 1) throw std::invalid_argument("integer entropy model: " + name + " must be a scalar");
  return v[0];
}

Linear linear(const py::dict& d, const std::string& p, int64_t lo, int64_t hi) {
  Linear L;
  if (!d.contains((p + ".w").c_str())) throw std::invalid_argument("integer entropy model: missing " + p + ".w");
  Arr<int16_t> w = d[(p + ".w").c_str()].cast<Arr<int16_t>>();
  if (w.ndim() != 2) throw std::invalid_argument("integer entropy model: " + p + ".w must be 2-D");
  L.dout = int(w.shape(0));
  L.din = int(w.shape(1));
  L.w.assign(w.data(), w.data() + w.size());
  L.b = vec<int64_t>(d, p + ".b");
  L.mult = vec<int64_t>(d, p + ".mult");
  std::vector<int64_t> sh = vec<int64_t>(d, p + ".shift");
  L.shift.assign(sh.begin(), sh.end());
  L.lo = lo;
  L.hi = hi;
  return L;
}

void act_table(const py::dict& d, const std::string& name, int32_t* out) {
  std::vector<int32_t> a = vec<int32_t>(d, name);
  if (a.size() != 255) throw std::invalid_argument("integer entropy model: " + name + " must have 255 entries");
  for (int i = 0; i < 255; ++i) {
    if (a[i] < -127 || a[i] > 127) throw std::invalid_argument("integer entropy model: " + name + " out of [-127, 127]");
    out[i] = a[i];
  }
}

std::shared_ptr<Model> make_model(const py::dict& t, const py::dict& meta, Arr<int64_t> exp_att,
                                  Arr<int64_t> exp_prob) {
  auto m = std::make_shared<Model>();
  auto get = [&](const char* k) { return meta[k].cast<int>(); };
  m->M = get("num_subspaces");
  m->K = get("codebook_size");
  m->W = get("width");
  m->H = get("heads");
  m->R = get("radius");
  m->depth = get("depth");
  m->head_depth = get("head_depth");
  m->code_embedding = vec<int32_t>(t, "code_embedding");
  m->mask_embedding = vec<int32_t>(t, "mask_embedding");
  m->cond_embedding = vec<int32_t>(t, "cond_embedding");
  m->step_embedding = vec<int32_t>(t, "step_embedding");
  const int64_t res = int64_t(1) << 40;
  for (int i = 0; i < m->depth; ++i) {
    const std::string p = "blocks." + std::to_string(i);
    Block b;
    b.norm1 = int(scalar(t, p + ".norm1"));
    b.norm2 = int(scalar(t, p + ".norm2"));
    b.qkv = linear(t, p + ".qkv", -127, 127);
    b.proj = linear(t, p + ".proj", -res, res);
    b.fc1 = linear(t, p + ".fc1", -127, 127);
    b.fc2 = linear(t, p + ".fc2", -res, res);
    b.score_mult = int32_t(scalar(t, p + ".score_mult"));
    b.score_shift = int32_t(scalar(t, p + ".score_shift"));
    b.bias = vec<int32_t>(t, p + ".bias");
    act_table(t, p + ".act", b.act);
    m->blocks.push_back(std::move(b));
  }
  for (int i = 0; i < m->head_depth; ++i) {
    const std::string p = "head." + std::to_string(i);
    HeadBlock hb;
    hb.norm = int(scalar(t, p + ".norm"));
    hb.fc1 = linear(t, p + ".fc1", -127, 127);
    hb.fc2 = linear(t, p + ".fc2", -res, res);
    act_table(t, p + ".act", hb.act);
    m->head.push_back(std::move(hb));
  }
  m->out_norm = int(scalar(t, "out.norm"));
  m->out = linear(t, "out", -(int64_t(1) << 30), int64_t(1) << 30);
  m->exp_att.assign(exp_att.data(), exp_att.data() + exp_att.size());
  m->exp_prob.assign(exp_prob.data(), exp_prob.data() + exp_prob.size());
  m->finalize();
  return m;
}

// A Session plus the model it reads (kept alive) and a guard against concurrent use.
struct PySession {
  std::shared_ptr<Model> model;
  std::unique_ptr<Session> session;
  int h, w;
  std::atomic<bool> busy{false};
};

struct Guard {
  explicit Guard(PySession& s) : s_(s) {
    bool expected = false;
    if (!s_.busy.compare_exchange_strong(expected, true))
      throw std::runtime_error("this entropy-model Session is in use by another thread (use one per thread)");
  }
  ~Guard() { s_.busy.store(false); }
  PySession& s_;
};

void check_1d(const py::array& a, int64_t n, const char* name) {
  if (a.ndim() != 1 || a.shape(0) != n)
    throw std::invalid_argument(std::string(name) + " must be 1-D with " + std::to_string(n) + " entries");
}

}  // namespace

PYBIND11_MODULE(_intmim, mod) {
  mod.doc() = "Integer-exact entropy-model engine of pqmim-kernels (csrc/int_mim.cpp)";
  mod.attr("ABI_VERSION") = 1;
  mod.attr("SOURCE_FINGERPRINT") = PQMIM_SOURCE_FINGERPRINT;

  py::class_<Model, std::shared_ptr<Model>>(mod, "Model")
      .def(py::init(&make_model), py::arg("tensors"), py::arg("meta"), py::arg("exp_att"),
           py::arg("exp_prob"));

  py::class_<PySession>(mod, "Session")
      .def(py::init([](std::shared_ptr<Model> model, int h, int w, Arr<int64_t> key_stage) {
             if (h < 1 || w < 1) throw std::invalid_argument("Session: grid must be positive");
             check_1d(key_stage, int64_t(h) * w, "key_stage");
             auto s = std::make_unique<PySession>();
             s->model = model;
             s->h = h;
             s->w = w;
             s->session = std::make_unique<Session>(*model, h, w, key_stage.data());
             return s;
           }),
           py::arg("model"), py::arg("h"), py::arg("w"), py::arg("key_stage"))
      .def(
          "set_key_stage",
          [](PySession& s, Arr<int64_t> pos, Arr<int64_t> stage) {
            Guard g(s);
            const int64_t n = pos.size();
            check_1d(pos, n, "pos");
            check_1d(stage, n, "stage");
            s.session->set_key_stage(pos.data(), stage.data(), n);
          },
          py::arg("pos"), py::arg("stage"))
      .def(
          "known_stream",
          [](PySession& s, Arr<int64_t> codes, Arr<int64_t> pos, Arr<int64_t> stage, int threads) {
            Guard g(s);
            const int64_t n = pos.size();
            if (codes.ndim() != 2 || codes.shape(0) != n || codes.shape(1) != s.model->M)
              throw std::invalid_argument("known_stream: codes must be (n, M)");
            check_1d(pos, n, "pos");
            check_1d(stage, n, "stage");
            py::gil_scoped_release nogil;
            s.session->known_stream(codes.data(), pos.data(), stage.data(), n, threads);
          },
          py::arg("codes"), py::arg("pos"), py::arg("stage"), py::arg("threads") = 1)
      .def(
          "query_stream",
          [](PySession& s, Arr<int64_t> pos, Arr<int64_t> stage, int threads) {
            Guard g(s);
            const int64_t n = pos.size();
            check_1d(pos, n, "pos");
            check_1d(stage, n, "stage");
            py::array_t<int32_t> out({n, int64_t(s.model->W)});
            int32_t* o = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              s.session->query_stream(pos.data(), stage.data(), n, o, threads);
            }
            return out;
          },
          py::arg("pos"), py::arg("stage"), py::arg("threads") = 1)
      .def(
          "head_logits",
          [](PySession& s, Arr<int32_t> xq, Arr<int64_t> prefix, int m, int threads) {
            Guard g(s);
            const int64_t n = xq.ndim() == 2 ? xq.shape(0) : -1;
            if (n < 0 || xq.shape(1) != s.model->W)
              throw std::invalid_argument("head_logits: xq must be (n, W)");
            if (prefix.ndim() != 2 || prefix.shape(0) != n || prefix.shape(1) != s.model->M)
              throw std::invalid_argument("head_logits: prefix must be (n, M)");
            py::array_t<int32_t> out({n, int64_t(s.model->K)});
            int32_t* o = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              s.session->head_logits(xq.data(), prefix.data(), n, m, o, threads);
            }
            return out;
          },
          py::arg("xq"), py::arg("prefix"), py::arg("m"), py::arg("threads") = 1);

  mod.def(
      "window_attention",
      [](Arr<int8_t> q, Arr<int64_t> q_pos, Arr<int64_t> q_limit, Arr<int8_t> k_cache,
         Arr<int8_t> v_cache, Arr<int64_t> key_stage, int h, int w, int radius, int score_mult,
         int score_shift, Arr<int32_t> bias, Arr<int64_t> exp_table, int threads) {
        if (q.ndim() != 3) throw std::invalid_argument("window_attention: q must be (nq, H, Dh)");
        const int64_t nq = q.shape(0);
        const int heads = int(q.shape(1)), dh = int(q.shape(2));
        check_1d(q_pos, nq, "q_pos");
        check_1d(q_limit, nq, "q_limit");
        check_1d(key_stage, int64_t(h) * w, "key_stage");
        if (k_cache.size() != int64_t(h) * w * heads * dh || v_cache.size() != k_cache.size())
          throw std::invalid_argument("window_attention: caches must be (h*w, H, Dh)");
        if (radius < 0 || radius > kMaxRadius) throw std::invalid_argument("window_attention: radius");
        if (bias.size() != int64_t(heads) * (2 * radius + 1) * (2 * radius + 1))
          throw std::invalid_argument("window_attention: bias must be (H, 2R+1, 2R+1)");
        if (exp_table.size() != 256) throw std::invalid_argument("window_attention: exp table");
        for (int64_t i = 0; i < nq; ++i)
          if (q_pos.data()[i] < 0 || q_pos.data()[i] >= int64_t(h) * w)
            throw std::out_of_range("window_attention: q_pos out of the grid");
        py::array_t<int32_t> out({nq, int64_t(heads), int64_t(dh)});
        int32_t* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          window_attention(q.data(), q_pos.data(), q_limit.data(), nq, k_cache.data(),
                           v_cache.data(), key_stage.data(), h, w, heads, dh, radius,
                           score_mult, score_shift, bias.data(), exp_table.data(), o, threads);
        }
        return out;
      },
      py::arg("q"), py::arg("q_pos"), py::arg("q_limit"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("key_stage"), py::arg("h"), py::arg("w"), py::arg("radius"), py::arg("score_mult"),
      py::arg("score_shift"), py::arg("bias"), py::arg("exp_table"), py::arg("threads") = 1);

  mod.def(
      "logits_to_cdfs",
      [](Arr<int32_t> logits, int precision, Arr<int64_t> exp_table, int threads) {
        if (logits.ndim() != 2) throw std::invalid_argument("logits_to_cdfs: logits must be (n, K)");
        if (precision < 1 || precision > 24) throw std::invalid_argument("logits_to_cdfs: precision");
        if (exp_table.size() != 256) throw std::invalid_argument("logits_to_cdfs: exp table");
        const int64_t n = logits.shape(0);
        const int k = int(logits.shape(1));
        if (k < 1) throw std::invalid_argument("logits_to_cdfs: K must be >= 1");
        py::array_t<int32_t> out({n, int64_t(k) + 1});
        int32_t* o = out.mutable_data();
        {
          py::gil_scoped_release nogil;
          logits_to_cdfs(logits.data(), n, k, precision, exp_table.data(), o, threads);
        }
        return out;
      },
      py::arg("logits"), py::arg("precision"), py::arg("exp_table"), py::arg("threads") = 1);
}
