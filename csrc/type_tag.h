#pragma once
// A type as a value, for the dtype dispatchers (optimizer_types.h, cpu/rowwise.h): each case calls
// a generic lambda or a tag-deduced template with TypeTag<T>{}.

namespace pyeff {

template <typename T> struct TypeTag { using type = T; };

}  // namespace pyeff
