#ifndef GETDCMTAGS_TEXT_H
#define GETDCMTAGS_TEXT_H

// JSON text and numbers as Python writes and reads them, and small string helpers: the
// building blocks of getdcmtags' output (mercli/tags/__init__.py defines what is printed).

#include <cstddef>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace getdcmtags {

// A JSON value already serialized; `empty` marks an empty text item (JSON "").
struct Json {
    std::string text;
    bool empty = false;
};

std::string jsonString(const std::string &s);
Json textValue(const std::string &s);
// NaN and infinities as the strings "nan", "inf", "-inf"; FL as its shortest float32 decimal.
Json binaryFloat(double x, bool isFL);

// Python's str.isspace() for one byte of Latin-1 text, and str.strip() with it.
bool isPySpace(unsigned char c);
std::string pyStrip(const std::string &s);
std::string rstripSpaceNul(const std::string &s);

// IS: an integer, or a float that is one ("1.0"); otherwise the text itself.
Json intFromText(const std::string &text);
// DS: a float; NaN, infinite or unparseable stays the text.
Json floatFromText(const std::string &text);

std::string latin1ToUtf8(const std::string &s);
std::vector<std::string> split(const std::string &s, char delimiter);
bool startsWith(const std::string &s, const char *prefix);

template <size_t N>
const char *lookup(const std::pair<const char *, const char *> (&table)[N],
                   const std::string &key) {
    for (const auto &entry : table)
        if (key == entry.first) return entry.second;
    return nullptr;
}

template <size_t N>
bool inList(const std::string &term, const char *const (&list)[N]) {
    for (const char *item : list)
        if (term == item) return true;
    return false;
}

}  // namespace getdcmtags

#endif  // GETDCMTAGS_TEXT_H
