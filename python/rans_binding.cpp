// pybind11 face of the rANS core (csrc/rans.hpp): flat numpy buffers in (no conversion, no
// copies: the Python layer in pqmim_kernels/coding/rans.py prepares dtypes and layouts),
// bytes out, GIL released around all coding work. csrc::Error surfaces as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "rans.hpp"

namespace py = pybind11;
namespace rc = pqmim::rans;

namespace {

template <class T>
using carray = py::array_t<T, py::array::c_style>;

void need_ndim(const py::array& a, int ndim, const char* name) {
  if (a.ndim() != ndim)
    throw rc::Error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " +
                    std::to_string(a.ndim()) + "-D");
}

void need_rows(const py::array& a, int64_t n, const char* name) {
  if (a.shape(0) != n)
    throw rc::Error(std::string(name) + " has " + std::to_string(a.shape(0)) +
                    " rows but symbols/indexes have " + std::to_string(n));
}

// (N, K+1) CDF rows -> K; the last axis must hold at least 2 entries.
int64_t cdf_k(const py::array& a, const char* name) {
  if (a.shape(1) < 2)
    throw rc::Error(std::string(name) + " must have K + 1 >= 2 columns, got " +
                    std::to_string(a.shape(1)));
  return a.shape(1) - 1;
}

}  // namespace

PYBIND11_MODULE(_rans, m) {
  m.doc() = "pqmim_kernels rANS coder core (use pqmim_kernels.coding, not this module)";
  m.attr("ABI_VERSION") = rc::kAbiVersion;
#ifdef PQMIM_SOURCE_FINGERPRINT
  m.attr("SOURCE_FINGERPRINT") = PQMIM_SOURCE_FINGERPRINT;
#else
  m.attr("SOURCE_FINGERPRINT") = "";
#endif
  m.attr("DEFAULT_PRECISION") = rc::kDefaultPrecision;
  m.attr("MAX_PRECISION") = rc::kMaxPrecision;
  m.attr("INTERLEAVE_MIN_SYMBOLS") = rc::kInterleaveMinSymbols;
  py::register_exception<rc::Error>(m, "RansError", PyExc_ValueError);

  m.def(
      "quantize_probs",
      [](carray<float> probs, int precision, int num_threads) {
        need_ndim(probs, 2, "probs");
        int64_t n = probs.shape(0), k = probs.shape(1);
        carray<int32_t> cdfs({n, k + 1});
        const float* p = probs.data();
        int32_t* c = cdfs.mutable_data();
        {
          py::gil_scoped_release release;
          rc::quantize_probs(p, n, k, precision, c, num_threads);
        }
        return cdfs;
      },
      py::arg("probs").noconvert(), py::arg("precision"), py::arg("num_threads") = 1);

  m.def(
      "check_cdf_table",
      [](carray<int32_t> table, int precision) {
        need_ndim(table, 2, "cdf_table");
        int64_t k = cdf_k(table, "cdf_table");
        const int32_t* t = table.data();
        int64_t rows = table.shape(0);
        py::gil_scoped_release release;
        rc::check_cdf_table(t, rows, k, precision);
      },
      py::arg("cdf_table").noconvert(), py::arg("precision"));

  py::class_<rc::Encoder>(m, "Encoder")
      .def(py::init([](int precision, int lanes, int num_threads, bool compact) {
             return new rc::Encoder(precision, lanes, num_threads,
                                    compact ? rc::Framing::kCompact : rc::Framing::kStandard);
           }),
           py::arg("precision"), py::arg("lanes") = 0, py::arg("num_threads") = 1,
           py::arg("compact") = false)
      .def(
          "push_probs",
          [](rc::Encoder& e, carray<int64_t> symbols, carray<float> probs) {
            need_ndim(symbols, 1, "symbols");
            need_ndim(probs, 2, "probs");
            need_rows(probs, symbols.shape(0), "probs");
            const int64_t* s = symbols.data();
            const float* p = probs.data();
            int64_t n = symbols.shape(0), k = probs.shape(1);
            py::gil_scoped_release release;
            e.push_probs(s, p, n, k);
          },
          py::arg("symbols").noconvert(), py::arg("probs").noconvert())
      .def(
          "push_cdfs",
          [](rc::Encoder& e, carray<int64_t> symbols, carray<int32_t> cdfs) {
            need_ndim(symbols, 1, "symbols");
            need_ndim(cdfs, 2, "cdfs");
            need_rows(cdfs, symbols.shape(0), "cdfs");
            int64_t k = cdf_k(cdfs, "cdfs");
            const int64_t* s = symbols.data();
            const int32_t* c = cdfs.data();
            int64_t n = symbols.shape(0);
            py::gil_scoped_release release;
            e.push_cdfs(s, c, n, k);
          },
          py::arg("symbols").noconvert(), py::arg("cdfs").noconvert())
      .def(
          "push_indexed",
          [](rc::Encoder& e, carray<int64_t> symbols, carray<int64_t> indexes,
             carray<int32_t> table) {
            need_ndim(symbols, 1, "symbols");
            need_ndim(indexes, 1, "indexes");
            need_ndim(table, 2, "cdf_table");
            need_rows(indexes, symbols.shape(0), "indexes");
            int64_t k = cdf_k(table, "cdf_table");
            const int64_t* s = symbols.data();
            const int64_t* ix = indexes.data();
            const int32_t* t = table.data();
            int64_t n = symbols.shape(0), rows = table.shape(0);
            py::gil_scoped_release release;
            e.push_indexed(s, ix, n, t, rows, k);
          },
          py::arg("symbols").noconvert(), py::arg("indexes").noconvert(),
          py::arg("cdf_table").noconvert())
      .def("finish",
           [](rc::Encoder& e) {
             std::vector<uint8_t> out;
             {
               py::gil_scoped_release release;
               out = e.finish();
             }
             return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
           })
      .def_property_readonly("pending", &rc::Encoder::pending)
      .def_property_readonly("precision", &rc::Encoder::precision);

  py::class_<rc::Decoder>(m, "Decoder")
      .def(py::init([](const py::bytes& data, int precision, int num_threads, bool compact,
                       int64_t symbols, int lanes) {
             std::string_view v = data;
             return new rc::Decoder(reinterpret_cast<const uint8_t*>(v.data()), v.size(),
                                    precision, num_threads,
                                    compact ? rc::Framing::kCompact : rc::Framing::kStandard,
                                    symbols, lanes);
           }),
           py::arg("data"), py::arg("precision"), py::arg("num_threads") = 1,
           py::arg("compact") = false, py::arg("symbols") = -1, py::arg("lanes") = 0)
      .def(
          "pop_probs",
          [](rc::Decoder& d, carray<float> probs) {
            need_ndim(probs, 2, "probs");
            int64_t n = probs.shape(0), k = probs.shape(1);
            carray<int64_t> out(n);
            const float* p = probs.data();
            int64_t* o = out.mutable_data();
            {
              py::gil_scoped_release release;
              d.pop_probs(p, n, k, o);
            }
            return out;
          },
          py::arg("probs").noconvert())
      .def(
          "pop_cdfs",
          [](rc::Decoder& d, carray<int32_t> cdfs) {
            need_ndim(cdfs, 2, "cdfs");
            int64_t k = cdf_k(cdfs, "cdfs");
            int64_t n = cdfs.shape(0);
            carray<int64_t> out(n);
            const int32_t* c = cdfs.data();
            int64_t* o = out.mutable_data();
            {
              py::gil_scoped_release release;
              d.pop_cdfs(c, n, k, o);
            }
            return out;
          },
          py::arg("cdfs").noconvert())
      .def(
          "pop_indexed",
          [](rc::Decoder& d, carray<int64_t> indexes, carray<int32_t> table) {
            need_ndim(indexes, 1, "indexes");
            need_ndim(table, 2, "cdf_table");
            int64_t k = cdf_k(table, "cdf_table");
            int64_t n = indexes.shape(0), rows = table.shape(0);
            carray<int64_t> out(n);
            const int64_t* ix = indexes.data();
            const int32_t* t = table.data();
            int64_t* o = out.mutable_data();
            {
              py::gil_scoped_release release;
              d.pop_indexed(ix, n, t, rows, k, o);
            }
            return out;
          },
          py::arg("indexes").noconvert(), py::arg("cdf_table").noconvert())
      .def("finish", &rc::Decoder::finish)
      .def_property_readonly("lanes", &rc::Decoder::lanes)
      .def_property_readonly("decoded", &rc::Decoder::decoded)
      .def_property_readonly("remaining_bytes", &rc::Decoder::remaining_bytes);
}
