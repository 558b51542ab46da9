// The sidecar of one file: which elements, how each becomes JSON; see sidecar.h.

#include "sidecar.h"

#include "charset.h"
#include "text.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>

namespace getdcmtags {

struct Field {
    const char *keyword;
    Uint16 group;
    Uint16 element;
};

// Same keywords, same order as SIDECAR_KEYWORDS in mercli/tags/spec.py.
const Field kSidecar[] = {
    {"SOPClassUID", 0x0008, 0x0016},
    {"SOPInstanceUID", 0x0008, 0x0018},
    {"SeriesInstanceUID", 0x0020, 0x000E},
    {"StudyInstanceUID", 0x0020, 0x000D},
    {"TransferSyntaxUID", 0x0002, 0x0010},
    {"Modality", 0x0008, 0x0060},
    {"PatientID", 0x0010, 0x0020},
    {"PatientName", 0x0010, 0x0010},
    {"PatientBirthDate", 0x0010, 0x0030},
    {"PatientSex", 0x0010, 0x0040},
    {"AccessionNumber", 0x0008, 0x0050},
    {"StudyID", 0x0020, 0x0010},
    {"StudyDate", 0x0008, 0x0020},
    {"StudyTime", 0x0008, 0x0030},
    {"StudyDescription", 0x0008, 0x1030},
    {"SeriesDescription", 0x0008, 0x103E},
    {"SeriesNumber", 0x0020, 0x0011},
    {"SeriesDate", 0x0008, 0x0021},
    {"SeriesTime", 0x0008, 0x0031},
    {"InstanceNumber", 0x0020, 0x0013},
    {"AcquisitionNumber", 0x0020, 0x0012},
    {"BodyPartExamined", 0x0018, 0x0015},
    {"ProtocolName", 0x0018, 0x1030},
    {"Manufacturer", 0x0008, 0x0070},
    {"ManufacturerModelName", 0x0008, 0x1090},
    {"StationName", 0x0008, 0x1010},
    {"DeviceSerialNumber", 0x0018, 0x1000},
    {"SoftwareVersions", 0x0018, 0x1020},
    {"InstitutionName", 0x0008, 0x0080},
    {"ReferringPhysicianName", 0x0008, 0x0090},
    {"ImageType", 0x0008, 0x0008},
    {"SliceThickness", 0x0018, 0x0050},
    {"MagneticFieldStrength", 0x0018, 0x0087},
    {"SequenceName", 0x0018, 0x0024},
    {"ScanningSequence", 0x0018, 0x0020},
    {"SequenceVariant", 0x0018, 0x0021},
    {"ContrastBolusAgent", 0x0018, 0x0010},
    {"ImageComments", 0x0020, 0x4000},
    {"NumberOfFrames", 0x0028, 0x0008},
};

// Reading stops at the first top-level tag at or above this one: after NumberOfFrames.
const DcmTagKey kStopAt(0x0028, 0x0009);

// --- elements ----------------------------------------------------------------------------------

const std::string &vrKind(const std::string &vr) {
    static const std::string text = "text", integer = "int", none;
    static const char *const texts[] = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN",
                                        "SH", "ST", "TM", "UC", "UI", "UR", "UT"};
    static const char *const ints[] = {"IS", "US", "UL", "SS", "SL", "SV", "UV"};
    if (inList(vr, texts)) return text;
    if (inList(vr, ints)) return integer;
    if (vr == "DS" || vr == "FL" || vr == "FD" || vr == "AT") return vr;
    return none;
}

bool isCharsetVR(const std::string &vr) {
    return vr == "LO" || vr == "LT" || vr == "PN" || vr == "SH" || vr == "ST" || vr == "UC" ||
           vr == "UT";
}

// The single value, or a list; empty (no output) when every value is empty.
std::string pack(const std::vector<Json> &values) {
    bool allEmpty = true;
    for (const Json &v : values) allEmpty = allEmpty && v.empty;
    if (values.empty() || allEmpty) return "";
    if (values.size() == 1) return values[0].text;
    std::string out = "[";
    for (size_t i = 0; i < values.size(); ++i) out += (i ? "," : "") + values[i].text;
    return out + "]";
}

std::string personName(const std::string &value) {
    std::vector<std::string> groups = split(value, '=');
    while (!groups.empty() && groups.back().empty()) groups.pop_back();
    std::string out;
    for (size_t i = 0; i < groups.size(); ++i) out += (i ? "=" : "") + groups[i];
    return out;
}

std::vector<Json> textValues(const std::string &vr, const std::string &raw, TextDecoder &text) {
    std::vector<Json> values;
    if (!isCharsetVR(vr)) {
        std::string decoded = latin1ToUtf8(raw);
        if (vr == "AE") {
            for (const std::string &item : split(decoded, '\\'))
                values.push_back(textValue(pyStrip(item)));
        } else if (vr == "UR") {
            size_t e = decoded.size();
            while (e > 0 && isPySpace(static_cast<unsigned char>(decoded[e - 1]))) --e;
            values.push_back(textValue(decoded.substr(0, e)));
        } else {
            for (const std::string &item : split(rstripSpaceNul(decoded), '\\'))
                values.push_back(textValue(item));
        }
        return values;
    }
    if (vr == "PN") {
        for (const std::string &item : split(text.decode(rstripSpaceNul(raw)), '\\'))
            values.push_back(textValue(personName(item)));
        return values;
    }
    std::string decoded = text.decode(raw);
    if (vr == "LT" || vr == "ST" || vr == "UT") {
        values.push_back(textValue(rstripSpaceNul(decoded)));
    } else {
        for (const std::string &item : split(decoded, '\\'))
            values.push_back(textValue(rstripSpaceNul(item)));
    }
    return values;
}

std::string hexTag(Uint16 group, Uint16 element) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%04X,%04X", group, element);
    return buf;
}

// Binary numbers from raw little-endian bytes (an element read as UN).
template <typename T>
std::vector<T> unpackLE(const std::string &raw) {
    std::vector<T> out(raw.size() / sizeof(T));
    for (size_t i = 0; i < out.size(); ++i) {
        uint64_t bits = 0;
        for (size_t b = 0; b < sizeof(T); ++b) {
            unsigned char byte = static_cast<unsigned char>(raw[i * sizeof(T) + b]);
            bits |= static_cast<uint64_t>(byte) << (8 * b);
        }
        T value;
        if constexpr (sizeof(T) == 8) {
            std::memcpy(&value, &bits, 8);
        } else if constexpr (sizeof(T) == 4) {
            uint32_t narrow = static_cast<uint32_t>(bits);
            std::memcpy(&value, &narrow, 4);
        } else {
            uint16_t narrow = static_cast<uint16_t>(bits);
            std::memcpy(&value, &narrow, 2);
        }
        out[i] = value;
    }
    return out;
}

template <typename T>
std::vector<Json> intValues(const std::vector<T> &numbers) {
    std::vector<Json> values;
    for (T n : numbers) values.push_back(Json{std::to_string(n)});
    return values;
}

template <typename T>
std::vector<Json> floatValues(const std::vector<T> &numbers, bool isFL) {
    std::vector<Json> values;
    for (T n : numbers) values.push_back(binaryFloat(static_cast<double>(n), isFL));
    return values;
}

// Binary VRs from their little-endian bytes; empty when not a whole number of values.
std::vector<Json> binaryValues(const std::string &vr, const std::string &raw) {
    static const std::pair<const char *, size_t> sizes[] = {
        {"US", 2}, {"SS", 2}, {"UL", 4}, {"SL", 4}, {"FL", 4},
        {"AT", 4}, {"FD", 8}, {"SV", 8}, {"UV", 8}};
    size_t size = 0;
    for (const auto &entry : sizes)
        if (vr == entry.first) size = entry.second;
    if (size == 0 || raw.size() % size != 0) return {};
    if (vr == "US") return intValues(unpackLE<uint16_t>(raw));
    if (vr == "SS") return intValues(unpackLE<int16_t>(raw));
    if (vr == "UL") return intValues(unpackLE<uint32_t>(raw));
    if (vr == "SL") return intValues(unpackLE<int32_t>(raw));
    if (vr == "UV") return intValues(unpackLE<uint64_t>(raw));
    if (vr == "SV") return intValues(unpackLE<int64_t>(raw));
    if (vr == "FL") return floatValues(unpackLE<float>(raw), true);
    if (vr == "FD") return floatValues(unpackLE<double>(raw), false);
    std::vector<Json> values;  // AT
    std::vector<uint16_t> words = unpackLE<uint16_t>(raw);
    for (size_t i = 0; i + 1 < words.size(); i += 2)
        values.push_back(textValue(hexTag(words[i], words[i + 1])));
    return values;
}

// Points `data` at the values of a binary element through one typed getter of DcmElement.
template <typename T>
OFCondition typedArray(DcmElement &element, OFCondition (DcmElement::*getter)(T *&), void *&data) {
    T *values = nullptr;
    OFCondition status = (element.*getter)(values);
    data = values;
    return status;
}

// Points `data` at the values of a binary element, through the getter of its own class
// (DCMTK answers EC_IllegalCall for the others).
OFCondition binaryArray(DcmElement &element, const std::string &vr, void *&data) {
    if (vr == "US" || vr == "AT") return typedArray(element, &DcmElement::getUint16Array, data);
    if (vr == "SS") return typedArray(element, &DcmElement::getSint16Array, data);
    if (vr == "UL") return typedArray(element, &DcmElement::getUint32Array, data);
    if (vr == "SL") return typedArray(element, &DcmElement::getSint32Array, data);
    if (vr == "FL") return typedArray(element, &DcmElement::getFloat32Array, data);
    if (vr == "FD") return typedArray(element, &DcmElement::getFloat64Array, data);
    if (vr == "UV") return typedArray(element, &DcmElement::getUint64Array, data);
    if (vr == "SV") return typedArray(element, &DcmElement::getSint64Array, data);
    return EC_IllegalCall;
}

// The little-endian bytes of a binary element (DCMTK holds it in machine byte order).
std::string binaryBytes(DcmElement &element, const std::string &vr) {
    void *data = nullptr;
    if (binaryArray(element, vr, data).bad() || data == nullptr) return {};
    std::string raw(static_cast<const char *>(data), element.getLength());
    size_t size = (vr == "US" || vr == "SS" || vr == "AT")                ? 2
                  : (vr == "UL" || vr == "SL" || vr == "FL")              ? 4
                                                                          : 8;
    if (gLocalByteOrder == EBO_BigEndian)
        for (size_t i = 0; i + size <= raw.size(); i += size)
            std::reverse(raw.begin() + i, raw.begin() + i + size);
    return raw;
}

// The sidecar JSON of one element; empty when it is to be left out.
std::string elementJson(DcmElement &element, TextDecoder &text) {
    DcmTag tag = element.getTag();
    DcmEVR evr = element.getVR();
    std::string vr = DcmVR(evr).getVRName();
    bool raw = false;
    if (evr == EVR_UN) {  // pydicom reads UN by the dictionary's VR
        const DcmDataDictionary &dict = dcmDataDict.rdlock();
        const DcmDictEntry *entry = dict.findEntry(tag.getXTag(), tag.getPrivateCreator());
        vr = entry != nullptr ? DcmVR(entry->getEVR()).getVRName() : "UN";
        dcmDataDict.rdunlock();
        raw = true;
    }
    if (vr == "xs" || vr == "US or SS") vr = "US";
    const std::string &kind = vrKind(vr);
    if (kind.empty() || element.getLength() == 0) return "";
    std::string bytes;
    if (raw) {
        Uint8 *data = nullptr;
        if (element.getUint8Array(data).bad() || data == nullptr) return "";
        bytes.assign(reinterpret_cast<char *>(data), element.getLength());
    } else if (element.isaString()) {
        char *data = nullptr;
        Uint32 length = 0;
        if (element.getString(data, length).bad() || data == nullptr) return "";
        bytes.assign(data, length);
    } else {
        bytes = binaryBytes(element, vr);
    }
    if (kind == "text") return pack(textValues(vr, bytes, text));
    if (vr == "IS") {
        std::vector<Json> values;
        for (const std::string &item : split(rstripSpaceNul(latin1ToUtf8(bytes)), '\\'))
            values.push_back(intFromText(item));
        return pack(values);
    }
    if (vr == "DS") {
        std::vector<Json> values;
        for (const std::string &item : split(rstripSpaceNul(pyStrip(latin1ToUtf8(bytes))), '\\'))
            values.push_back(floatFromText(item));
        return pack(values);
    }
    return pack(binaryValues(vr, bytes));
}

// Undefined-length sequences nested deeper than this are malformed (as in mercli/tags/__init__.py).
const int kMaxDepth = 64;

// How deep undefined-length sequences nest in `item` (through undefined-length items).
//
// Elements and items are walked with nextInContainer, which steps from the list's current
// position: linear. getElement(i) and getItem(k) walk the list from its start each time, which
// made a file of many small elements quadratic (a 3 MB header took a minute).
int undefinedDepth(DcmItem &item) {
    int deepest = 0;
    for (DcmObject *element = item.nextInContainer(nullptr); element != nullptr;
         element = item.nextInContainer(element)) {
        if (element->ident() != EVR_SQ || element->getLengthField() != DCM_UndefinedLength)
            continue;
        DcmSequenceOfItems &sequence = *static_cast<DcmSequenceOfItems *>(element);
        int depth = 1;
        for (DcmObject *child = sequence.nextInContainer(nullptr); child != nullptr;
             child = sequence.nextInContainer(child)) {
            if (child->getLengthField() == DCM_UndefinedLength)  // an item: a DcmItem
                depth = std::max(depth, 1 + undefinedDepth(*static_cast<DcmItem *>(child)));
        }
        deepest = std::max(deepest, depth);
        if (deepest > kMaxDepth) break;
    }
    return deepest;
}

// The bytes of (0008,0005) as stored, whatever VR it was written with.
bool rawCharset(DcmElement &element, std::string &charset) {
    std::string vr = DcmVR(element.getVR()).getVRName();
    if (element.isaString()) {
        char *data = nullptr;
        Uint32 length = 0;
        if (element.getString(data, length).bad() || data == nullptr) return false;
        charset.assign(data, length);
        return true;
    }
    Uint8 *bytes = nullptr;
    if (element.getUint8Array(bytes).good() && bytes != nullptr) {
        charset.assign(reinterpret_cast<char *>(bytes), element.getLength());
        return true;
    }
    charset = binaryBytes(element, vr);
    return !charset.empty();
}

// The sidecar fields of one file; throws Unreadable.
Fields sidecarFields(const char *path) {
    struct stat info;
    if (stat(path, &info) != 0) throw Unreadable(std::strerror(errno));
    if (S_ISDIR(info.st_mode)) throw Unreadable(std::strerror(EISDIR));
    if (info.st_size == 0) throw Unreadable("not a DICOM file: empty");
    DcmFileFormat file;
    OFCondition status = file.loadFileUntilTag(path, EXS_Unknown, EGL_noChange, DCM_MaxReadLength,
                                               ERM_autoDetect, kStopAt);
    if (status.bad())
        throw Unreadable(std::string("cannot parse DICOM data (") + status.text() + ")");
    DcmDataset *dataset = file.getDataset();
    DcmMetaInfo *meta = file.getMetaInfo();
    std::string charset;
    bool hasCharset = false;
    DcmElement *element = nullptr;
    if (undefinedDepth(*dataset) > kMaxDepth) throw Unreadable("sequences nested too deeply");
    if (dataset->findAndGetElement(DCM_SpecificCharacterSet, element, OFFalse).good() && element)
        hasCharset = rawCharset(*element, charset);
    TextDecoder text(hasCharset ? &charset : nullptr);
    Fields out;
    for (const Field &field : kSidecar) {
        DcmTagKey key(field.group, field.element);
        element = nullptr;
        if (dataset->findAndGetElement(key, element, OFFalse).bad() || element == nullptr) {
            element = nullptr;
            if (meta == nullptr || meta->findAndGetElement(key, element, OFFalse).bad()) continue;
        }
        if (element == nullptr) continue;
        std::string value = elementJson(*element, text);
        if (value.empty()) continue;
        out.emplace_back(field.keyword, value);
    }
    if (out.empty()) throw Unreadable("no DICOM attributes found");
    return out;
}

std::string toJson(const Fields &fields) {
    std::string out;
    for (const auto &field : fields)
        out += (out.empty() ? "{" : ",") + jsonString(field.first) + ":" + field.second;
    return out.empty() ? "{}" : out + "}";
}

// The sidecar line of one file; throws Unreadable.
std::string sidecar(const char *path) { return toJson(sidecarFields(path)); }

}  // namespace getdcmtags
